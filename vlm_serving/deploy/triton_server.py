"""Start, wait for and stop the real Triton Inference Server on the model repository.

`vlm_serving.deploy.stack` runs it with the gateway (`make run`, `make up`, `make down`).
On these machines the `tritonserver` binary comes from the `nvidia-pytriton` wheel; in production
it is the one in NVIDIA's Triton container, on the same model repository. Three environment facts
make the wheel's binary work (see docs/development.md, "How Triton runs here"): its bundled libraries and
libpython on LD_LIBRARY_PATH, the Python-backend stub for this interpreter beside the backend
library, and this virtualenv first on PATH so that the stub imports from its site-packages.
The server runs in its own process group, so stopping it also ends every Python stub.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vlm_serving.generation.cancellation import board_path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD = REPO_ROOT / "build"


# The gateway pings its Triton connections (VLM_TRITON_KEEPALIVE_S) to find half-open ones. Triton's
# defaults count a ping without data inside 5 minutes as a strike and close the connection after
# two, which would fail every request on the gateway's shared stream: accept pings at any rate.
# docker-compose.yml and deploy/ pass the same flags (tests/unit/test_deployment.py checks).
GRPC_KEEPALIVE_FLAGS = ("--grpc-keepalive-permit-without-calls=1", "--grpc-http2-max-ping-strikes=0")


# The models read the collector from here (the stubs inherit Triton's environment).
OTLP_ENDPOINT_VARIABLE = "VLM_OTLP_ENDPOINT"


def trace_flags(otlp_endpoint: str | None) -> list[str]:
    """Triton's own OpenTelemetry tracing to an OTLP/HTTP collector (the only exporter Triton has):
    every request traced (rate 1: the gateway decides which requests carry a sampled `traceparent`,
    Triton's spans join that trace). Triton batches its exports like the SDKs do
    (OTEL_BSP_SCHEDULE_DELAY and the other OTEL_BSP_* variables apply)."""
    if not otlp_endpoint:
        return []
    return ["--trace-config=mode=opentelemetry", "--trace-config=rate=1", "--trace-config=count=-1",
            "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={otlp_endpoint.rstrip('/')}/v1/traces",
            "--trace-config=opentelemetry,resource=service.name=triton"]


class TritonError(RuntimeError):
    pass


@dataclass
class TritonServer:
    repository: Path = REPO_ROOT / "model_repository"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    model_control: str = "explicit"  # or "poll"
    # Models to load at start in explicit mode; "*" is every model of the repository.
    load_models: tuple[str, ...] = ("*",)
    log_path: Path = BUILD / "triton.log"
    extra_env: dict[str, str] = field(default_factory=dict)
    # An OTLP/HTTP collector (e.g. "http://localhost:4318"): Triton traces every request
    # (`trace_flags`) and the models' own spans go there too (vlm_serving/tracing.py). None: no tracing.
    otlp_endpoint: str | None = None
    # Where the started process is recorded (see `record`) until it is stopped; None: nowhere.
    pid_file: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def command(self) -> list[str]:
        server, backends = locate_triton()
        args = [
            str(server),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control}",
            "--strict-readiness=true",
            *GRPC_KEEPALIVE_FLAGS,
            *trace_flags(self.otlp_endpoint),
        ]
        if self.model_control == "explicit":
            args += [f"--load-model={name}" for name in self.load_models]
        else:
            args.append("--repository-poll-secs=2")
        return args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(site_packages() / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        # The stub embeds Python and finds its prefix through `python3` on PATH: this venv's.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        # Bytecode written into a version folder looks like a change to the repository poller.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if self.otlp_endpoint:
            env[OTLP_ENDPOINT_VARIABLE] = self.otlp_endpoint
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command, env = self.command(), self.environment()
        with open(self.log_path, "ab") as log, uninterrupted():  # started is recorded: never orphaned
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
            if self.pid_file is not None:
                record(self.pid_file, self.process.pid)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until our tritonserver child is ready: alive, answering, and the one listening on the port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with code {self.process.returncode} while loading; "
                    f"the cause is at the end of {self.log_path}:\n{tail(self.log_path)}"
                )
            if self.is_ready():
                if self.process is not None and not listens_on(self.process.pid, self.http_port):
                    raise TritonError(
                        f"port {self.http_port} answers as a ready Triton, but not from the tritonserver started "
                        f"here (pid {self.process.pid}): another server holds it; stop it or set TRITON_HTTP_PORT"
                    )
                return
            time.sleep(0.5)
        raise TritonError(f"tritonserver not ready after {timeout:.0f}s; see {self.log_path}:\n{tail(self.log_path)}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None:
            return
        with uninterrupted():
            stop_process_group(self.process.pid, timeout)
            self.process.wait()
            board_path(self.process.pid).unlink(missing_ok=True)
            if self.pid_file is not None:
                self.pid_file.unlink(missing_ok=True)
            self.process = None


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself has a TCP socket listening on `port`."""
    import psutil

    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def busy_ports(address: str, ports: dict[str, int]) -> list[str]:
    """"port N (SETTING)" for each of `ports` that cannot be bound on `address` now."""
    import socket

    busy = []
    for setting, port in ports.items():
        family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no owner
            try:
                probe.bind(sockaddr)
            except OSError:
                busy.append(f"port {port} ({setting})")
    return busy


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def locate_triton() -> tuple[Path, Path]:
    """(tritonserver binary, backend directory holding a Python backend with this interpreter's stub)."""
    root = site_packages() / "pytriton" / "tritonserver"
    server = root / "bin" / "tritonserver"
    if not server.is_file():
        raise TritonError(f"no tritonserver at {server}: run `make setup` (installs nvidia-pytriton)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
    backends = BUILD / "triton" / "backends"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for source in (root / "backends" / "python" / "libtriton_python.so",
                   root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        target = python_backend / source.name
        if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
            shutil.copy2(source, target)
    return server, backends


def stop_process_group(pid: int, timeout: float = 60.0) -> None:
    """SIGTERM the group (server and stubs), then SIGKILL whatever is left after `timeout`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap the leader if it is our child, so the group can disappear
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def record(pid_file: Path, pid: int) -> None:
    """The pid with what identifies that process (start time, command line), so a later `down`
    never signals another process that happens to reuse the pid."""
    import psutil

    process = psutil.Process(pid)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(json.dumps({"pid": pid, "create_time": process.create_time(), "cmdline": process.cmdline()}))


def recorded_process(pid_file: Path) -> int | None:
    """The recorded pid if that very process still runs, else None (a stale or foreign record)."""
    import psutil

    try:
        recorded = json.loads(pid_file.read_text())
        process = psutil.Process(int(recorded["pid"]))
        if process.create_time() == recorded["create_time"] and process.cmdline() == recorded["cmdline"]:
            return process.pid
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        pass
    return None


# Signals and cleanup. A launcher or benchmark run by `make` in a terminal or under a supervisor
# gets each SIGTERM or SIGINT twice or more: the group's signal, then make forwarding it to its
# child. The first one stops the program; the later ones must not cut its cleanup short, or
# Triton and its stubs are left running, holding their ports.
_stopping = False  # a signal asked this process to stop: later ones add nothing
_held = False  # that signal came during an `uninterrupted` block and is raised at its end
_uninterrupted_depth = 0


def _stop_requested(*_) -> None:
    global _stopping, _held
    if _stopping:
        return
    _stopping = True
    if _uninterrupted_depth:
        _held = True
        return
    raise KeyboardInterrupt()


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, once, so the caller's cleanup runs (the
    signals after the first are ignored); one that comes during an `uninterrupted` block is raised
    at its end."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_requested)


@contextmanager
def uninterrupted():
    """A start or stop that must run to its end: a signal arriving meanwhile (see
    `stop_on_signals`) is raised as KeyboardInterrupt when the outermost such block ends."""
    global _held, _uninterrupted_depth
    _uninterrupted_depth += 1
    try:
        yield
    finally:
        _uninterrupted_depth -= 1
    if _held and not _uninterrupted_depth:
        _held = False
        raise KeyboardInterrupt()


def stop_all(processes: Iterable) -> None:
    """Stop each of `processes` (servers, gateways: anything with `stop()`), in order, every one of
    them whatever signals arrive meanwhile."""
    with uninterrupted():
        for process in processes:
            process.stop()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
