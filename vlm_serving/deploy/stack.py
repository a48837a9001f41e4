"""Run the whole stack: Triton on the model repository, then the gateway in front of it.

    python -m vlm_serving.deploy.stack run     # foreground (make run); Ctrl-C stops both
    python -m vlm_serving.deploy.stack up      # background (make up); pids and logs under build/
    python -m vlm_serving.deploy.stack down    # make down

Both bind to loopback. Unless VLM_API_KEYS / VLM_ADMIN_API_KEYS are set, the gateway accepts the
documented local development keys `dev-local-key` and, for the admin RPCs, `dev-admin-key`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vlm_serving.generation.cancellation import board_path
from vlm_serving.deploy.triton_server import (BUILD, REPO_ROOT, TritonError, TritonServer, busy_ports,
                                              stop_process_group, tail)

DEV_API_KEY = "dev-local-key"
DEV_ADMIN_API_KEY = "dev-admin-key"
PID_FILES = {"gateway": BUILD / "gateway.pid", "triton": BUILD / "triton.pid"}


@dataclass
class GatewayProcess:
    """`python -m gateway` as a child process in its own process group."""

    triton_url: str
    address: str = "localhost:50051"
    metrics_port: int = 9090
    # The OpenAI-compatible HTTP API's host:port; "off" (the default here, so gateways side by side
    # never compete for one port; `make run` serves it on localhost:8080).
    http_address: str = "off"
    api_keys: str = DEV_API_KEY
    log_path: Path = BUILD / "gateway.log"
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.setdefault("VLM_API_KEYS", self.api_keys)
        env.setdefault("VLM_ADMIN_API_KEYS", DEV_ADMIN_API_KEY)
        env.update(
            VLM_TRITON_URL=self.triton_url,
            VLM_LISTEN_ADDRESS=self.address,
            VLM_METRICS_PORT=str(self.metrics_port),
            VLM_HTTP_ADDRESS=self.http_address,
            **self.extra_env,
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway"], env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return reply.status
            except grpc.RpcError:
                return health_pb2.HealthCheckResponse.UNKNOWN

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonError(f"gateway exited with code {self.process.returncode}:\n{tail(self.log_path)}")
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.3)
        raise TritonError(f"gateway not serving after {timeout:.0f}s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM: the gateway drains (calls in flight finish for up to VLM_DRAIN_GRACE_S); killed
        only if it is still there well after that."""
        if self.process is not None:
            grace = float(self.extra_env.get("VLM_DRAIN_GRACE_S") or os.environ.get("VLM_DRAIN_GRACE_S") or 30)
            stop_process_group(self.process.pid, timeout=grace + 10)
            self.process.wait()
            self.process = None


def try_command(address: str) -> str:
    return (f"VLM_API_KEY={DEV_API_KEY} .venv/bin/vlm --address {address} generate --model qwen2.5-vl "
            "--image build/models/example.png 'What is in this picture?' --stream")


def record(pid_file: Path, pid: int) -> None:
    """The pid with what identifies that process (start time, command line), so a later `down`
    never signals another process that happens to reuse the pid."""
    import psutil

    process = psutil.Process(pid)
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


def down() -> int:
    for name, pid_file in PID_FILES.items():
        if not pid_file.is_file():
            continue
        pid = recorded_process(pid_file)
        if pid is None:
            print(f"{name}: not running (stale pid file removed; nothing signalled)")
        else:
            stop_process_group(pid)
            if name == "triton":
                board_path(pid).unlink(missing_ok=True)
            print(f"{name}: stopped")
        pid_file.unlink()
    return 0


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, like Ctrl-C, so the caller's cleanup runs."""
    def interrupt(*_):
        raise KeyboardInterrupt()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run Triton and the gateway.")
    parser.add_argument("action", choices=["run", "up", "down"])
    parser.add_argument("--model-control", choices=["explicit", "poll"], default="explicit")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for Triton's readiness")
    args = parser.parse_args(argv)
    if args.action == "down":
        return down()
    running = [name for name, pid_file in PID_FILES.items() if pid_file.is_file() and recorded_process(pid_file)]
    if running:
        print(f"{', '.join(running)}: already started (pid files in build/); `make down` stops them")
        return 1
    for pid_file in PID_FILES.values():
        pid_file.unlink(missing_ok=True)  # stale: their processes are gone
    triton = TritonServer(
        model_control=args.model_control,
        http_port=int(os.environ.get("TRITON_HTTP_PORT", 8000)),
        grpc_port=int(os.environ.get("TRITON_GRPC_PORT", 8001)),
        metrics_port=int(os.environ.get("TRITON_METRICS_PORT", 8002)),
    )
    gateway = GatewayProcess(
        triton_url=triton.grpc_url,
        address=os.environ.get("VLM_LISTEN_ADDRESS", "localhost:50051"),
        metrics_port=int(os.environ.get("VLM_METRICS_PORT", 9090)),
        http_address=os.environ.get("VLM_HTTP_ADDRESS", "localhost:8080"),
    )
    busy = busy_ports(triton.address, {"TRITON_HTTP_PORT": triton.http_port, "TRITON_GRPC_PORT": triton.grpc_port,
                                       "TRITON_METRICS_PORT": triton.metrics_port})
    listen = urlsplit(f"//{gateway.address}")
    busy += busy_ports(listen.hostname or "localhost", {"VLM_LISTEN_ADDRESS": listen.port})
    busy += busy_ports(os.environ.get("VLM_METRICS_ADDRESS", "127.0.0.1"), {"VLM_METRICS_PORT": gateway.metrics_port})
    if gateway.http_address != "off":
        http = urlsplit(f"//{gateway.http_address}")
        busy += busy_ports(http.hostname or "localhost", {"VLM_HTTP_ADDRESS": http.port})
    if busy:
        print(f"stack: {', '.join(busy)} already in use; stop what holds it or choose another port with "
              "that setting", file=sys.stderr)
        return 1
    stop_on_signals()
    started = time.monotonic()
    try:
        triton.start()
        record(PID_FILES["triton"], triton.process.pid)
        triton.wait_ready(args.timeout)
        print(f"triton: ready in {time.monotonic() - started:.1f}s (gRPC {triton.grpc_url}; log {triton.log_path})")
        gateway.start()
        record(PID_FILES["gateway"], gateway.process.pid)
        gateway.wait_serving()
    except (TritonError, KeyboardInterrupt) as exc:
        gateway.stop()
        triton.stop()
        for pid_file in PID_FILES.values():
            pid_file.unlink(missing_ok=True)
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    print(f"gateway: serving vlm.v1 on {gateway.address}, the OpenAI-compatible API on http://{gateway.http_address} "
          f"(metrics :{gateway.metrics_port}; log {gateway.log_path})")
    print(f"try:  {try_command(gateway.address)}")
    if args.action == "up":
        print("stop with:  make down")
        return 0
    print("stop with:  Ctrl-C")
    try:
        while triton.process.poll() is None and gateway.process.poll() is None:
            time.sleep(0.5)
        print(f"stack: a process exited; see {triton.log_path} and {gateway.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stack: stopping")
        return 0
    finally:
        gateway.stop()
        triton.stop()
        for pid_file in PID_FILES.values():
            pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
