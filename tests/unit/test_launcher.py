"""The launcher (`make up/run/down`) never signals, waits on or wires up a process that is not its own."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import http_host
from vlm_serving.deploy import stack
from vlm_serving.deploy.triton_server import TritonError, TritonServer, busy_ports, listens_on


def bystander() -> subprocess.Popen:
    """An unrelated process in its own process group, as a reused pid would name."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


@pytest.fixture
def pid_files(tmp_path, monkeypatch):
    files = {"gateway": tmp_path / "gateway.pid", "triton": tmp_path / "triton.pid"}
    monkeypatch.setattr(stack, "PID_FILES", files)
    return files


@pytest.mark.parametrize("content", [lambda p: str(p.pid),  # the old format: a bare pid
                                     lambda p: json.dumps({"pid": p.pid, "create_time": 1.0, "cmdline": ["tritonserver"]})])
def test_down_never_signals_a_process_that_only_reuses_the_pid(pid_files, content, capsys):
    other = bystander()
    try:
        pid_files["triton"].write_text(content(other))
        assert stack.down() == 0
        assert other.poll() is None, "an unrelated process was signalled"
        assert not pid_files["triton"].exists() and "stale pid file removed" in capsys.readouterr().out
    finally:
        other.kill()
        other.wait()


def test_down_stops_the_process_it_recorded(pid_files):
    ours = bystander()
    stack.record(pid_files["gateway"], ours.pid)
    assert stack.down() == 0
    assert ours.wait(10) is not None and not pid_files["gateway"].exists()


def test_up_is_not_refused_by_a_stale_pid_file(pid_files, monkeypatch, capsys):
    pid_files["triton"].write_text("999999")
    with socket.socket() as holder:  # stop `up` at its port check, after the pid files were judged
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        monkeypatch.setenv("TRITON_HTTP_PORT", str(holder.getsockname()[1]))
        assert stack.main(["up"]) == 1
    err = capsys.readouterr()
    assert "already started" not in err.out and not pid_files["triton"].exists()


def test_a_busy_port_stops_start_up_at_once_naming_its_setting(pid_files, monkeypatch, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert busy_ports("127.0.0.1", {"TRITON_GRPC_PORT": port}) == [f"port {port} (TRITON_GRPC_PORT)"]
        monkeypatch.setenv("TRITON_GRPC_PORT", str(port))
        assert stack.main(["up"]) == 1
    message = capsys.readouterr().err
    assert f"port {port} (TRITON_GRPC_PORT) already in use" in message and "Traceback" not in message
    assert not pid_files["triton"].exists()


class _ReadyTriton(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_readiness_must_come_from_our_own_child(tmp_path):
    with http_host(_ReadyTriton) as host:  # a foreign server answering ready on the port
        port = int(host.rsplit(":", 1)[1])
        server = TritonServer(http_port=port, log_path=tmp_path / "triton.log")
        server.process = bystander()  # our child, alive but not serving
        try:
            assert not listens_on(server.process.pid, port)
            with pytest.raises(TritonError, match=f"port {port} answers as a ready Triton, but not from"):
                server.wait_ready(timeout=5)
        finally:
            server.process.kill()
            server.process.wait()


def test_listens_on_sees_a_processs_own_listening_socket():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        import os

        assert listens_on(os.getpid(), listener.getsockname()[1])

