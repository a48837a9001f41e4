"""Row 23 of `make bench` (also alone): a server lost under load (issue 29, item 5).

    .venv/bin/python -m perf.fault_row [--quick]

Three Triton servers (Qwen2.5-VL's pipeline, one math thread each) behind one gateway, on loopback.
Callers stream answers (a 160x120 picture and a question, 48 tokens, greedy) one after another for a
steady phase; then the server with the most of this gateway's requests in flight is SIGKILLed and
started again at once (a replacement, as an orchestrator would), and the load goes on until the
replacement has answered requests and a few seconds more. Reported:

- 23a: requests lost, streams included: every call that did not end with a whole answer (the goal
  is 0: streams that had begun on the killed server are continued on another, gateway/migration.py);
  beside it, the streams migrated (the gateway's vlm_stream_migrations_total);
- 23b: p99 latency of the requests in flight at the kill or started until the replacement took
  traffic, ÷ the steady phase's p99;
- 23c: seconds from the kill until the replacement took traffic (its first request answered, from
  its own statistics), with the part that is the server's own start (until it was ready).

All processes share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from perf.bench import BENCH, KEY, free_port, launch, print_table, progress, repository, run_on_bench_loop
from perf.stats import percentile
from perf.workload import synthetic_image
from vlm_serving.deploy.stack import DEV_ADMIN_API_KEY, GatewayProcess, stop_on_signals
from vlm_serving.deploy.triton_server import TritonServer, stop_all
from vlm_serving.pipelines import pipeline

CALLERS, MAX_TOKENS = 6, 48
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# After the replacement's first answer, the load goes on this long (it takes its share meanwhile).
AFTER_REPLACEMENT_S = 5.0


@dataclass
class Call:
    started: float
    latency: float = 0.0
    error: str = ""


@dataclass
class Load:
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def stream_callers(address: str, load: Load) -> None:
    """CALLERS callers, each streaming one answer after another until `load.stop`."""
    picture = synthetic_image(160, 120, "PNG", seed=23)
    metadata = (("authorization", f"Bearer {KEY}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = vlm_pb2_grpc.VisionLanguageServiceStub(channel)

        async def caller(index: int) -> None:
            turn = 0
            while not load.stop.is_set():
                turn += 1
                request = vlm_pb2.GenerateRequest(
                    model="qwen2.5-vl", config=vlm_pb2.GenerationConfig(max_tokens=MAX_TOKENS, temperature=0.0),
                    messages=[vlm_pb2.Message(role="user", parts=[
                        vlm_pb2.Part(image=vlm_pb2.Image(data=picture)),
                        vlm_pb2.Part(text=f"Caller {index}, question {turn}: what is in the picture?")])])
                call = Call(time.monotonic())
                load.calls.append(call)
                try:
                    last = None
                    async for message in stub.GenerateStream(request, metadata=metadata, timeout=120):
                        last = message
                    if last is None or last.usage.completion_tokens == 0:
                        call.error = "no final message"
                except grpc.aio.AioRpcError as error:
                    call.error = f"{error.code().name}: {error.details()}"
                call.latency = time.monotonic() - call.started

        await asyncio.gather(*(caller(i) for i in range(CALLERS)))


def answered(server: TritonServer) -> int:
    """Requests the server's qwen2_5_vl ensemble completed since it started (its own statistics)."""
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/qwen2_5_vl/stats", timeout=2) as reply:
            stats = json.load(reply)["model_stats"]
    except OSError:  # not up yet
        return 0
    return sum(int(model["inference_stats"]["success"]["count"]) for model in stats)


def busiest(gateway: GatewayProcess) -> str:
    """The address of the server with the most of the gateway's requests in flight."""
    with grpc.insecure_channel(gateway.address) as channel:
        reply = vlm_pb2_grpc.ModelAdminServiceStub(channel).ListBackends(
            vlm_pb2.ListBackendsRequest(), metadata=(("authorization", f"Bearer {DEV_ADMIN_API_KEY}"),), timeout=10)
    return max(reply.backends, key=lambda backend: backend.outstanding_requests).address


def migrations(gateway: GatewayProcess) -> dict[str, float]:
    """vlm_stream_migrations_total by outcome."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    counts: dict[str, float] = {}
    for line in lines:
        if line.startswith("vlm_stream_migrations_total{"):
            labels, value = line[len("vlm_stream_migrations_total{"):].rsplit("} ", 1)
            outcome = dict(part.split("=", 1) for part in labels.split(","))["outcome"].strip('"')
            counts[outcome] = counts.get(outcome, 0.0) + float(value)
    return counts


@dataclass
class Failure:
    killed_at: float = 0.0
    ready_after: float = 0.0
    traffic_after: float = 0.0


def kill_and_replace(gateway: GatewayProcess, tritons: list[TritonServer], steady_s: float, failure: Failure,
                     load: Load, loop: asyncio.AbstractEventLoop) -> None:
    """After `steady_s`, SIGKILL the busiest server, start it again, note when it is ready and when it
    answered its first request; stop the load AFTER_REPLACEMENT_S later."""
    time.sleep(steady_s)
    address = busiest(gateway)
    server = next(t for t in tritons if t.grpc_url == address)
    progress(f"row 23: SIGKILL of the Triton server at {address} under load")
    os.killpg(server.process.pid, signal.SIGKILL)
    failure.killed_at = time.monotonic()
    server.process.wait()
    server.stop()  # clean up what the kill left (the stubs' cancellation board)
    server.start()
    server.wait_ready(300)
    failure.ready_after = time.monotonic() - failure.killed_at
    while answered(server) == 0:
        time.sleep(0.1)
    failure.traffic_after = time.monotonic() - failure.killed_at
    progress(f"row 23: the replacement was ready after {failure.ready_after:.1f} s, took traffic after "
             f"{failure.traffic_after:.1f} s")
    time.sleep(AFTER_REPLACEMENT_S)
    loop.call_soon_threadsafe(load.stop.set)


def start(own: list) -> tuple[list[TritonServer], GatewayProcess]:
    tritons = []
    for name in ("fault_a", "fault_b", "fault_c"):
        progress(f"starting Triton '{name}'")
        server = TritonServer(repository=repository(name), http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port(), log_path=BENCH / f"{name}.log",
                              load_models=(*pipeline("qwen2_5_vl"), "cancel"), extra_env=ONE_THREAD)
        launch(server, own)
        tritons.append(server)
    for server in tritons:
        server.wait_ready(300)
    gateway = GatewayProcess(triton_url=",".join(t.grpc_url for t in tritons), address=f"127.0.0.1:{free_port()}",
                             metrics_port=free_port(), log_path=BENCH / "gateway_fault.log",
                             extra_env={"VLM_API_KEYS": KEY, "VLM_ADMIN_API_KEYS": DEV_ADMIN_API_KEY,
                                        "VLM_HEALTH_POLL_S": "0.5"})
    launch(gateway, own)
    gateway.wait_serving(60)
    return tritons, gateway


def rows(quick: bool = False) -> list[tuple]:
    """Rows 23a-c, on three servers and a gateway of their own (stopped after, signals too)."""
    own: list = []
    try:
        tritons, gateway = start(own)
        steady_s = 10.0 if quick else 30.0
        load, failure = Load(), Failure()

        async def measure():
            killer = threading.Thread(target=kill_and_replace, args=(gateway, tritons, steady_s, failure, load,
                                                                     asyncio.get_running_loop()))
            killer.start()
            await stream_callers(gateway.address, load)
            killer.join()

        progress(f"row 23: {CALLERS} streaming callers, {steady_s:.0f} s steady, then one of three servers killed")
        run_on_bench_loop(measure())
        outcomes = migrations(gateway)
    finally:
        stop_all(reversed(own))
    calls = [call for call in load.calls if call.latency]
    lost = [call for call in calls if call.error]
    steady = [c.latency for c in calls if c.started + c.latency < failure.killed_at]
    # In flight at the kill (started before, ended after), or started until the replacement took traffic.
    window_end = failure.killed_at + failure.traffic_after
    during = [c.latency for c in calls if c.started + c.latency >= failure.killed_at and c.started <= window_end]
    p99_steady, p99_during = percentile(steady, 99), percentile(during, 99)
    errors = sorted({call.error for call in lost})
    return [
        ("23a", f"requests lost, streams included, when one of three servers is SIGKILLed under load ({CALLERS} "
         f"streaming callers, {MAX_TOKENS} tokens)", f"{len(lost)} of {len(calls)}; streams migrated "
         f"{outcomes.get('migrated', 0):.0f}, refused {sum(v for k, v in outcomes.items() if k != 'migrated'):.0f}"
         + (f" (lost: {'; '.join(errors)})" if errors else ""), float(len(lost)), "0", "requests", ""),
        ("23b", "p99 latency while a server is lost (in flight at the kill, or started until the replacement took "
         "traffic) / steady", f"{p99_during * 1000:.0f} / {p99_steady * 1000:.0f} ms ({len(during)} / {len(steady)} "
         "requests)", p99_during / p99_steady, "reported", "x", ""),
        ("23c", "seconds from the kill until the replacement (the server started again) took traffic",
         f"{failure.traffic_after:.1f} s (ready after {failure.ready_after:.1f} s)", failure.traffic_after,
         "reported", "s", ""),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 10 s steady phase instead of 30 s")
    args = parser.parse_args(argv)
    stop_on_signals()
    BENCH.mkdir(parents=True, exist_ok=True)
    print_table(rows(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
