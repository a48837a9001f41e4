"""Starting Triton with environment overrides, and stopping it (and the whole stack, and a benchmark)
without leaving a server or stub process behind, whatever signals arrive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO_ROOT, encode, picture
from tests.integration.conftest import KEY, free_ports, make_repository, start_gateway, start_server
from vlm_serving.deploy.triton_server import busy_ports
from vlm_client import VLMClient
from vlm_serving.pipelines import pipeline
from vlm_serving.ensemble_client import generate, user_message

pytestmark = pytest.mark.integration


def stub_processes(repository: Path) -> list[int]:
    """Python-backend stubs still running for models of `repository`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" in cmdline and str(repository) in cmdline:
            found.append(int(pid))
    return found


def test_int8_language_models_and_encoders_by_environment_answer_and_stop_leaves_no_stubs(tmp_path, checkpoints):
    repository = make_repository(tmp_path / "model_repository", checkpoints)
    server = start_server(
        repository,
        load_models=(*pipeline("qwen2_5_vl"), *pipeline("pixtral")),
        extra_env={
            "VLM_QWEN2_5_VL_GENERATE_QUANTIZATION": "int8",
            "VLM_PIXTRAL_GENERATE_QUANTIZATION": "int8",
            "VLM_QWEN2_5_VL_ENCODER_VARIANT": "int8",
            "VLM_PIXTRAL_ENCODER_VARIANT": "int8",
        },
    )
    try:
        assert len(stub_processes(repository)) >= 4
        for family in ("qwen2_5_vl", "pixtral"):
            result = generate(server.grpc_url, family, user_message("int8?", 1), [encode(picture(96, 64))], max_tokens=8)
            assert result.completion_tokens == 8 and result.token_ids
        log = server.log_path.read_text()
        assert "quantization=int8" in log and "encoder.int8.onnx" in log
    finally:
        server.stop()
    assert stub_processes(repository) == []


def test_a_missing_checkpoint_fails_start_up_with_the_reason(tmp_path):
    repository = make_repository(tmp_path / "model_repository", tmp_path / "no-weights")
    with pytest.raises(RuntimeError, match="no checkpoint at .*make models"):
        start_server(repository, load_models=("pixtral_generate",))
    assert stub_processes(repository) == []


def test_overload_is_refused_at_once_not_queued_forever(tmp_path, checkpoints):
    """With a queue of one, a burst gets some answers and clear refusals, and nothing hangs."""
    from concurrent.futures import ThreadPoolExecutor

    from tritonclient.utils import InferenceServerException

    from vlm_serving.deploy.render import Batching

    repository = make_repository(
        tmp_path / "model_repository", checkpoints, generate_batching=Batching(1, (1,), 100, 1)
    )
    server = start_server(repository, load_models=tuple(pipeline("pixtral")))

    def call(_):
        try:
            return generate(server.grpc_url, "pixtral", user_message("busy?", 0), [], max_tokens=48, timeout=60)
        except InferenceServerException as exc:
            return exc

    def through_gateway(_):
        with VLMClient(gateway.address, api_key=KEY, retries=0, timeout=60) as client:
            try:
                return client.generate("pixtral", "busy?", max_tokens=48).usage.completion_tokens
            except grpc.RpcError as error:
                return error

    gateway = None
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
        gateway = start_gateway(server.grpc_url, tmp_path, VLM_MODELS="pixtral=pixtral")
        with ThreadPoolExecutor(12) as pool:
            via_gateway = list(pool.map(through_gateway, range(12)))
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
    refused = [r for r in results if isinstance(r, Exception)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert answered and all(r.completion_tokens == 48 for r in answered)
    assert refused and all("Exceeds maximum queue size" in r.message() for r in refused)
    # Through the public API the same overload is RESOURCE_EXHAUSTED, with what to do about it.
    gateway_refused = [r for r in via_gateway if isinstance(r, grpc.RpcError)]
    assert 48 in via_gateway and gateway_refused
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry with backoff" in r.details()
               for r in gateway_refused), [(r.code(), r.details()) for r in gateway_refused]


# `make run` and `make bench` as a terminal or a supervisor stops them: SIGTERM to the process group
# of make, which also forwards it to its child, so the launcher gets it twice (here three times).
# The launcher's pid files and logs, and the bench's folder, are the test's own, never the
# checkout's build/ (which `make up`, `make down` or another run may be using).
LAUNCHER = """
import functools, runpy, sys
from pathlib import Path
from vlm_serving.deploy import stack
folder, command = Path(sys.argv[1]), sys.argv[2]
stack.PID_FILES = {"gateway": folder / "gateway.pid", "triton": folder / "triton.pid"}
stack.BENCH_PIDS = folder / "bench-pids"
if command == "bench":
    from perf import bench
    bench.BENCH = folder / "bench"
    sys.argv = ["perf.http_row", "--quick"]
    runpy.run_module("perf.http_row", run_name="__main__")
else:
    stack.TritonServer = functools.partial(stack.TritonServer, log_path=folder / "triton.log")
    stack.GatewayProcess = functools.partial(stack.GatewayProcess, log_path=folder / "gateway.log")
    sys.exit(stack.main([command]))
"""
MAKEFILE = "run bench down:\n\t$(PY) $(LAUNCHER) $(FOLDER) $@\n"


def start_make(tmp_path, target: str, **env) -> subprocess.Popen:
    """`make <target>` (the launcher's run, a bench, or down) in its own process group."""
    import sys

    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "Makefile").write_text(MAKEFILE)
    return subprocess.Popen(["make", "-s", "-f", str(tmp_path / "Makefile"), target, f"PY={sys.executable}",
                             f"LAUNCHER={tmp_path / 'launcher.py'}", f"FOLDER={tmp_path}"],
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_line(process: subprocess.Popen, marker: str) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"exited before {marker!r}:\n{''.join(lines)}")


def what_runs(pid_files) -> tuple[set, set[int]]:
    """The processes recorded in `pid_files` with every member of their process groups (Triton's
    stubs), as psutil processes, and the ports they listen on."""
    import psutil

    leaders = [json.loads(path.read_text())["pid"] for path in pid_files]
    processes = {p for p in psutil.process_iter() if p.pid in leaders or _group_of(p.pid) in leaders}
    ports = {c.laddr.port for p in processes for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return processes, ports


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def assert_all_stopped(processes: set, ports: set[int]) -> None:
    import psutil

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not running:
            break
        time.sleep(0.2)
    assert not running, f"still running: {[(p.pid, p.name()) for p in running]}"
    assert busy_ports("127.0.0.1", {f"port {port}": port for port in ports}) == []


def stop_leftovers(processes: set) -> None:
    """What a failed test left behind (only processes this test started)."""
    for process in processes:
        try:
            process.kill()
        except Exception:
            pass


def signal_group_twice(make: subprocess.Popen) -> str:
    os.killpg(make.pid, signal.SIGTERM)
    time.sleep(0.5)  # the stop under way: the gateway draining, then Triton unloading
    os.killpg(make.pid, signal.SIGTERM)
    output, _ = make.communicate(timeout=180)
    return output


def test_make_run_stopped_by_sigterm_to_its_group_twice_stops_everything(tmp_path):
    http, grpc_port, metrics, listen, gateway_metrics, gateway_http = free_ports(6)
    make = start_make(tmp_path, "run", TRITON_HTTP_PORT=str(http), TRITON_GRPC_PORT=str(grpc_port),
                      TRITON_METRICS_PORT=str(metrics), VLM_LISTEN_ADDRESS=f"127.0.0.1:{listen}",
                      VLM_METRICS_PORT=str(gateway_metrics), VLM_HTTP_ADDRESS=f"127.0.0.1:{gateway_http}")
    processes: set = set()
    try:
        wait_for_line(make, "stop with:  Ctrl-C")
        processes, ports = what_runs([tmp_path / "triton.pid", tmp_path / "gateway.pid"])
        assert {http, grpc_port, metrics, listen, gateway_metrics, gateway_http} <= ports
        assert sum("triton_python_backend_stub" in " ".join(p.cmdline()) for p in processes) >= 4
        output = signal_group_twice(make)
        assert_all_stopped(processes, ports)
        assert "stack: stopping" in output and "Traceback" not in output, output
        assert not (tmp_path / "triton.pid").exists() and not (tmp_path / "gateway.pid").exists()
    finally:
        make.kill()
        stop_leftovers(processes)


def test_make_bench_stopped_by_sigterm_to_its_group_twice_stops_everything(tmp_path):
    make = start_make(tmp_path, "bench")
    processes: set = set()
    try:
        wait_for_line(make, "row 13: three rounds")  # its Triton and gateway serve the load
        processes, ports = what_runs(sorted((tmp_path / "bench-pids").glob("*.pid")))
        assert len({_group_of(p.pid) for p in processes}) == 2 and len(ports) >= 5
        signal_group_twice(make)
        assert_all_stopped(processes, ports)
        assert list((tmp_path / "bench-pids").iterdir()) == []
    finally:
        make.kill()
        stop_leftovers(processes)


def test_make_down_stops_what_a_killed_bench_left(tmp_path):
    bench = start_make(tmp_path, "bench")
    processes: set = set()
    try:
        wait_for_line(bench, "row 13: three rounds")
        processes, ports = what_runs(sorted((tmp_path / "bench-pids").glob("*.pid")))
        os.killpg(bench.pid, signal.SIGKILL)  # no cleanup at all: its servers run on in their own groups
        bench.wait()
        assert all(p.is_running() for p in processes)
        down = start_make(tmp_path, "down")
        output, _ = down.communicate(timeout=120)
        assert down.returncode == 0 and output.count(": stopped") == 2, output
        assert_all_stopped(processes, ports)
        assert list((tmp_path / "bench-pids").iterdir()) == []
    finally:
        bench.kill()
        stop_leftovers(processes)
