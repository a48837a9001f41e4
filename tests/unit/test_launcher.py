"""The launcher (`make up/run/down`) never signals, waits on or wires up a process that is not its own,
and its cleanup (and a benchmark's) runs to its end whatever signals arrive."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    monkeypatch.setattr(stack, "PID_FILES", dict(files))
    # Never the checkout's own: `down` stops every process recorded there.
    files["bench"] = tmp_path / "bench-pids"
    files["bench"].mkdir()
    monkeypatch.setattr(stack, "BENCH_PIDS", files["bench"], raising=False)
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
        assert listens_on(os.getpid(), listener.getsockname()[1])



# A server that takes a while to stop (as Triton finishing its requests and unloading; it marks the
# file named by its argument when its stop begins), and one whose process group holds a second
# process (as Triton and its Python-backend stubs). Each says "up" when it is.
SLOW_TO_STOP = ("import pathlib, signal, sys, time\n"
                "stopping = []\n"
                "signal.signal(signal.SIGTERM, lambda *_: stopping.append(pathlib.Path(sys.argv[1]).touch()))\n"
                "print('up', flush=True)\n"
                "while not stopping:\n"
                "    time.sleep(0.05)\n"
                "time.sleep(1.5)\n")
WITH_A_STUB = ("import subprocess, sys, time\n"
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
               "print('up', flush=True)\n"
               "time.sleep(120)\n")


def group_members(pgid: int) -> list[int]:
    import psutil

    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def server_group(code: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 10
    while code is WITH_A_STUB and len(group_members(process.pid)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process


def run_signalled(script: str, signals: int, marker: Path,
                  once_stopping: bool = False) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run `script` (its first stdout lines: the pids of its servers, then "ready"; its argument:
    `marker`, for the slow server) in its own process group; send SIGTERM to that group `signals`
    times, 0.3 s apart, as a supervisor and make would; `once_stopping`: only once that server's
    stop has begun."""
    process = subprocess.Popen([sys.executable, "-c", script, str(marker)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=stack.REPO_ROOT)
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
        assert process.stdout.readline().strip() == "ready", process.communicate()
        deadline = time.monotonic() + 30
        while once_stopping and not marker.exists():
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.01)
        for _ in range(signals):
            os.killpg(process.pid, signal.SIGTERM)
            time.sleep(0.3)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), pids


def kill_groups(*pgids: int) -> None:
    """What a failed test left (never a group this test did not start)."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Both servers started and up, with the pids printed; signals then stop the program (its "ready" is
# printed where the code under test runs).
SERVERS = f"""
import subprocess, sys, time
from vlm_serving.deploy.stack import GatewayProcess, stop_on_signals
from vlm_serving.deploy.triton_server import TritonServer
gateway, triton = GatewayProcess(triton_url="unused"), TritonServer()
started = dict(stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
gateway.process = subprocess.Popen([sys.executable, "-c", {SLOW_TO_STOP!r}, sys.argv[1]], **started)
triton.process = subprocess.Popen([sys.executable, "-c", {WITH_A_STUB!r}], **started)
assert [gateway.process.stdout.readline(), triton.process.stdout.readline()] == [b"up\\n", b"up\\n"]
print(gateway.process.pid, triton.process.pid, flush=True)
stop_on_signals()
"""


def assert_gone(*pgids: int) -> None:
    deadline = time.monotonic() + 10
    while any(group_members(pgid) for pgid in pgids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pgid in pgids for pid in group_members(pgid)], "a server or its stub is still running"


def test_a_second_signal_never_cuts_the_cleanup_short(tmp_path):
    """The first SIGTERM stops the launcher; the next ones (make forwards the group's signal to its
    child, a supervisor may repeat it) arrive while the first server is stopping."""
    script = SERVERS + """
try:
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
except KeyboardInterrupt:
    print("stopping", flush=True)
finally:
    gateway.stop()
    triton.stop()
    print("stopped", flush=True)
"""
    done, pids = run_signalled(script, signals=3, marker=tmp_path / "stopping")
    try:
        assert_gone(*pids)
        assert done.stdout.splitlines()[-2:] == ["stopping", "stopped"] and "Traceback" not in done.stderr, done.stderr
    finally:
        kill_groups(*pids)


def test_signals_during_a_cleanup_wait_for_its_end(tmp_path):
    """A cleanup that began without a signal (a bench's last step, a failed start-up) runs to its end;
    the signals that came meanwhile then stop the program."""
    script = SERVERS + """
from vlm_serving.deploy.triton_server import stop_all
print("ready", flush=True)
try:
    stop_all([gateway, triton])
    print("went on after the signals", flush=True)
except KeyboardInterrupt:
    print("interrupted after the cleanup", flush=True)
"""
    done, pids = run_signalled(script, signals=2, marker=tmp_path / "stopping", once_stopping=True)
    try:
        assert_gone(*pids)
        assert done.stdout.splitlines()[-1] == "interrupted after the cleanup", done.stderr
    finally:
        kill_groups(*pids)


def test_down_also_stops_what_a_killed_benchmark_left(pid_files):
    """A bench records each server it starts under build/bench/pids/; killed (SIGKILL: no cleanup),
    it leaves them running, and `make down` stops them with their whole process group."""
    left = [server_group(WITH_A_STUB), server_group(WITH_A_STUB)]
    try:
        for name, process in zip(("4242-batched", "4242-gateway"), left):
            stack.record(pid_files["bench"] / f"{name}.pid", process.pid)
        assert stack.down() == 0
        assert_gone(*(process.pid for process in left))
        assert list(pid_files["bench"].iterdir()) == []
    finally:
        kill_groups(*(process.pid for process in left))
        for process in left:
            process.wait()
