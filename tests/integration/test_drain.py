"""SIGTERM to the gateway, as a rolling update sends it: health says NOT_SERVING and every connection
is told to go at once (GOAWAY: clients move to another replica), streams in flight finish within the
grace period (or are cancelled after it, their generation rows freed in Triton), and the process
exits 0, every time."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import httpx2 as httpx
import pytest
from grpc_health.v1 import health_pb2

from tests.integration.conftest import KEY, start_gateway
from tests.integration.test_inflight import engine_metric, wait_for
from vlm_client import VLMClient

pytestmark = pytest.mark.integration


def streams_in_flight(client, count: int, prompt: str, max_tokens: int, model="pixtral") -> tuple[list, list[threading.Event]]:
    """`count` streams, each read to its end on its own thread; returns (their outcomes, their
    "first text arrived" events)."""
    outcomes: list = [None] * count
    begun = [threading.Event() for _ in range(count)]

    def read(i):
        messages = 0
        try:
            for message in client.stream(model, f"{prompt} {i}", max_tokens=max_tokens):
                messages += 1
                begun[i].set()
                last = message
            outcomes[i] = ("finished", last.finish_reason, last.usage.completion_tokens)
        except grpc.RpcError as error:
            outcomes[i] = ("failed", error.code(), messages)
            begun[i].set()

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return outcomes, begun, threads


def requests_counted(gateway) -> float:
    """Requests a gateway answered, from its own metrics."""
    text = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vlm_requests_total{") and 'code="OK"' in line)


def test_sigterm_moves_clients_to_another_replica_and_lets_streams_finish(triton, tmp_path):
    """A client on one persistent channel to two replicas (as a Service's addresses give it) keeps
    calling while the replica it is connected to drains: no call fails (the client retries only
    what provably did not run: a call gRPC refused as the server shut down), the streams in flight
    finish there, and the rest is answered by the other replica."""
    draining = start_gateway(triton.grpc_url, tmp_path / "a", VLM_DRAIN_GRACE_S="60")
    other = start_gateway(triton.grpc_url, tmp_path / "b")
    both = "ipv4:" + ",".join(gateway.address for gateway in (draining, other))  # pick_first: the first
    try:
        with VLMClient(both, api_key=KEY, timeout=120) as client:
            outcomes, begun, threads = streams_in_flight(client, 3, "Tell me about it", 300)
            assert all(event.wait(60) for event in begun)
            answered_by_other = requests_counted(other)
            failures, calls, stop = [], [0], threading.Event()

            def keep_calling():
                while not stop.is_set():
                    try:
                        client.generate("pixtral", "a new call", max_tokens=2)
                        calls[0] += 1
                    except grpc.RpcError as error:
                        failures.append((error.code(), error.details()))

            caller = threading.Thread(target=keep_calling, daemon=True)
            caller.start()
            wait_for(lambda: calls[0] >= 3)
            draining.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_for(lambda: draining.health() != health_pb2.HealthCheckResponse.SERVING, timeout=2)
            wait_for(lambda: requests_counted(other) >= answered_by_other + 5, timeout=30)
            stop.set()
            caller.join(30)
            for thread in threads:
                thread.join(60)
        assert failures == [], failures[:3]
        assert all(outcome[0] == "finished" and outcome[2] >= 1 for outcome in outcomes), outcomes
        assert draining.process.wait(30) == 0
        assert time.monotonic() - signalled < 60
    finally:
        draining.stop()
        other.stop()


def test_after_the_grace_period_the_rest_is_cancelled_and_its_rows_freed(triton, tmp_path):
    gateway = start_gateway(triton.grpc_url, tmp_path, VLM_DRAIN_GRACE_S="1")
    try:
        with VLMClient(gateway.address, api_key=KEY, retries=0, timeout=300) as client:
            # The tiny Qwen runs 4,000 tokens on this prompt without an end token: far beyond the grace.
            outcomes, begun, threads = streams_in_flight(client, 1, "Tell me a long story", 4000, model="qwen2.5-vl")
            assert begun[0].wait(60)
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            threads[0].join(30)
            ended_after = time.monotonic() - signalled
        # Ended with UNAVAILABLE (it ran in part), never CANCELLED (which says it never ran).
        assert outcomes[0][:2] == ("failed", grpc.StatusCode.UNAVAILABLE) and ended_after < 10, (outcomes, ended_after)
        assert gateway.process.wait(30) == 0
        wait_for(lambda: engine_metric(triton, "vlm_engine_running") == 0)  # the row was freed in Triton
    finally:
        gateway.stop()
