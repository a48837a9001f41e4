"""Run the whole stack: Triton on the model repository, then the gateway in front of it.

    python -m vlm_serving.deploy.stack run     # foreground (make run); Ctrl-C stops both
    python -m vlm_serving.deploy.stack up      # background (make up); pids and logs under build/
    python -m vlm_serving.deploy.stack down    # make down: also what a killed `make bench` left

Both bind to loopback. Unless VLM_API_KEYS / VLM_ADMIN_API_KEYS are set, the gateway accepts the
documented local development keys `dev-local-key` and, for the admin RPCs, `dev-admin-key`.
"""

from __future__ import annotations

import argparse
import os
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
                                              record, recorded_process, stop_all, stop_on_signals,
                                              stop_process_group, tail, uninterrupted)

DEV_API_KEY = "dev-local-key"
DEV_ADMIN_API_KEY = "dev-admin-key"
PID_FILES = {"gateway": BUILD / "gateway.pid", "triton": BUILD / "triton.pid"}
# The servers and gateways a benchmark (perf/) runs, one pid file each while they run: those of a
# bench that was killed before its cleanup stay, and `make down` stops them.
BENCH_PIDS = BUILD / "bench" / "pids"


# What the local stack answers to a request that leaves max_tokens unset.
LOCAL_DEFAULT_MAX_TOKENS = 256


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
    # Where the started process is recorded (see `record`) until it is stopped; None: nowhere.
    pid_file: Path | None = None
    process: subprocess.Popen | None = None
    # How health checks reach a gateway serving TLS (VLM_TLS_CERT_FILE); None: plain text.
    credentials: grpc.ChannelCredentials | None = None

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
        with open(self.log_path, "ab") as log, uninterrupted():  # started is recorded: never orphaned
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway"], env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            if self.pid_file is not None:
                record(self.pid_file, self.process.pid)

    def health(self) -> int:
        channel = (grpc.secure_channel(self.address, self.credentials) if self.credentials
                   else grpc.insecure_channel(self.address))
        with channel:
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
        if self.process is None:
            return
        grace = float(self.extra_env.get("VLM_DRAIN_GRACE_S") or os.environ.get("VLM_DRAIN_GRACE_S") or 30)
        with uninterrupted():
            stop_process_group(self.process.pid, timeout=grace + 10)
            self.process.wait()
            if self.pid_file is not None:
                self.pid_file.unlink(missing_ok=True)
            self.process = None


def try_command(address: str) -> str:
    return (f"VLM_API_KEY={DEV_API_KEY} .venv/bin/vlm --address {address} generate --model qwen2.5-vl "
            "--image build/models/example.png 'What is in this picture?' --stream")


def down() -> int:
    """Stop `make up`'s stack and whatever a killed benchmark left, each with its process group."""
    recorded = {**PID_FILES, **{f"bench {path.stem}": path for path in sorted(BENCH_PIDS.glob("*.pid"))}}
    for name, pid_file in recorded.items():
        if not pid_file.is_file():
            continue
        pid = recorded_process(pid_file)
        if pid is None:
            print(f"{name}: not running (stale pid file removed; nothing signalled)")
        else:
            stop_process_group(pid)
            board_path(pid).unlink(missing_ok=True)  # a Triton's cancellation board (others have none)
            print(f"{name}: stopped")
        pid_file.unlink()
    return 0


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
        # The gateway reads the same variable from the environment it inherits (gateway/tracing.py).
        otlp_endpoint=os.environ.get("VLM_OTLP_ENDPOINT") or None,
    )
    gateway = GatewayProcess(
        triton_url=triton.grpc_url,
        address=os.environ.get("VLM_LISTEN_ADDRESS", "localhost:50051"),
        metrics_port=int(os.environ.get("VLM_METRICS_PORT", 9090)),
        http_address=os.environ.get("VLM_HTTP_ADDRESS", "localhost:8080"),
        # The tiny random-weight models rarely end an answer: one left unbounded would run to the
        # end of the context (minutes on a CPU). VLM_DEFAULT_MAX_TOKENS="" lifts the cap.
        extra_env={"VLM_DEFAULT_MAX_TOKENS": os.environ.get("VLM_DEFAULT_MAX_TOKENS", str(LOCAL_DEFAULT_MAX_TOKENS))},
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
    triton.pid_file, gateway.pid_file = PID_FILES["triton"], PID_FILES["gateway"]
    stop_on_signals()
    try:
        return serve(args.action, triton, gateway, args.timeout)
    except KeyboardInterrupt:  # a signal held until the cleanup of a failure was done: it is done
        return 1


def serve(action: str, triton: TritonServer, gateway: GatewayProcess, ready_timeout: float) -> int:
    """Start Triton, then the gateway; `up` leaves both serving, `run` watches them until a signal
    or an exit. Whatever fails or interrupts stops both, whatever signals arrive meanwhile."""
    serving = leave_running = False
    started = time.monotonic()
    try:
        triton.start()
        triton.wait_ready(ready_timeout)
        print(f"triton: ready in {time.monotonic() - started:.1f}s (gRPC {triton.grpc_url}; log {triton.log_path})")
        gateway.start()
        gateway.wait_serving()
        serving = True
        print(f"gateway: serving vlm.v1 on {gateway.address}, the OpenAI-compatible API on "
              f"http://{gateway.http_address} (metrics :{gateway.metrics_port}; log {gateway.log_path})")
        print(f"try:  {try_command(gateway.address)}")
        if action == "up":
            leave_running = True
            print("stop with:  make down")
            return 0
        print("stop with:  Ctrl-C")
        while triton.process.poll() is None and gateway.process.poll() is None:
            time.sleep(0.5)
        print(f"stack: a process exited; see {triton.log_path} and {gateway.log_path}", file=sys.stderr)
        return 1
    except TritonError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stack: stopping")
        return 0 if serving else 1  # asked to stop / start-up cut short
    finally:
        if not leave_running:
            stop_all([gateway, triton])


if __name__ == "__main__":
    sys.exit(main())
