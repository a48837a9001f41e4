"""The gateway over a pool of real Triton servers (tiny Pixtral on each, own repository copy, own
ports): load spread by Triton's own statistics, a new version loaded on every server, a server found
by re-resolving a name, a server killed under load and restarted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from vlm.v1 import vlm_pb2

from gateway.triton_backend import TritonBackend
from gateway.triton_pool import TritonPool
from tests.integration.conftest import KEY, make_repository, start_gateway
from vlm_client.client import VLMClient
from vlm_serving.deploy.stack import DEV_ADMIN_API_KEY
from vlm_serving.deploy.triton_server import TritonServer
from vlm_serving.generation.sampling import SamplingParams
from vlm_serving.pipelines import pipeline

pytestmark = pytest.mark.integration
PIXTRAL_ONLY = (*pipeline("pixtral"), "cancel")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, checkpoints):
    """Three Triton servers, started together."""
    from tests.integration.conftest import free_ports

    started = []
    try:
        for name in "abc":
            directory = make_repository(tmp_path_factory.mktemp(f"pool-{name}") / "model_repository", checkpoints)
            http, grpc_port, metrics = free_ports(3)
            server = TritonServer(repository=directory, http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                                  log_path=directory.parent / "triton.log", load_models=PIXTRAL_ONLY)
            server.start()
            started.append(server)
        for server in started:
            server.wait_ready(timeout=300)
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def gateway(servers, tmp_path_factory):
    a, b, _ = servers
    gateway = start_gateway(f"{a.grpc_url},{b.grpc_url}", tmp_path_factory.mktemp("pool-gateway"),
                            VLM_MODELS="pixtral=pixtral", VLM_ADMIN_API_KEYS=DEV_ADMIN_API_KEY)
    yield gateway
    gateway.stop()


def served(server: TritonServer) -> int:
    """Requests the server's pixtral ensemble completed, from Triton's own statistics."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/pixtral/stats", timeout=5) as reply:
        stats = json.load(reply)["model_stats"]
    return sum(int(model["inference_stats"]["success"]["count"]) for model in stats)


def backends(gateway) -> dict[str, vlm_pb2.Backend]:
    with VLMClient(gateway.address, api_key=DEV_ADMIN_API_KEY) as admin:
        return {backend.address: backend for backend in admin.list_backends(timeout=10)}


def in_parallel(count: int, work) -> list:
    results = [None] * count

    def run(i):
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def served_since(servers, before: list[int], expected: int) -> list[int]:
    """Each server's requests completed since `before`, once they add up to `expected`: Triton counts a
    request in its statistics just after its last response leaves, so the last ones may lag the client."""
    deadline = time.monotonic() + 10
    while True:
        shares = [served(server) - start for server, start in zip(servers, before)]
        if sum(shares) >= expected or time.monotonic() > deadline:
            return shares
        time.sleep(0.05)


def test_load_spreads_over_the_servers(servers, gateway):
    a, b, _ = servers
    with VLMClient(gateway.address, api_key=KEY, retries=0) as client:
        # One caller at a time: every server idle at each choice, so ties take turns: an even split.
        before = [served(a), served(b)]
        for j in range(20):
            assert client.generate("pixtral", f"question {j}", max_tokens=4).usage.completion_tokens >= 1
        assert served_since((a, b), before, 20) == [10, 10]
        # Eight callers at once: each request goes to the server with the fewest in flight, so the eight
        # split evenly (not how many each server completes afterwards: that follows each server's speed,
        # which on a shared machine differs at random).
        before = [served(a), served(b)]
        everyone = threading.Barrier(8)

        def ask(i):
            everyone.wait()
            assert client.generate("pixtral", f"question {i}", max_tokens=64).usage.completion_tokens >= 1
        in_parallel(8, ask)
    shares = served_since((a, b), before, 8)
    assert sum(shares) == 8 and min(shares) >= 3, shares  # 4 / 4 when every choice saw the others in flight
    states = backends(gateway)
    assert set(states) == {a.grpc_url, b.grpc_url}
    assert all(state.healthy and list(state.ready_models) == ["pixtral"] and state.outstanding_requests == 0
               for state in states.values())
    listed = subprocess.run([sys.executable, "-m", "vlm_client.cli", "--address", gateway.address, "backends"],
                            env={**os.environ, "VLM_API_KEY": DEV_ADMIN_API_KEY}, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.splitlines()) == sorted(f"{server.grpc_url}\thealthy\tin_flight=0\tready=pixtral"
                                                        for server in (a, b))
    refused = subprocess.run([sys.executable, "-m", "vlm_client.cli", "--address", gateway.address, "backends"],
                             env={**os.environ, "VLM_API_KEY": KEY}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr  # admins only


def test_a_new_version_is_loaded_on_every_server_and_named_once_ready_everywhere(servers, gateway):
    a, b, _ = servers
    for server in (a, b):
        generate = server.repository / "pixtral_generate"
        shutil.copytree(generate / "1", generate / "2")
    with VLMClient(gateway.address, api_key=DEV_ADMIN_API_KEY, retries=0) as admin:
        reply = admin.load_model("pixtral")
        assert [(result.address, result.error) for result in reply.backends] == sorted(
            [(a.grpc_url, ""), (b.grpc_url, "")])
        assert {(v.version, v.state) for v in reply.model.versions} == {("2", "READY")}
    with VLMClient(gateway.address, api_key=KEY, retries=0) as client:
        versions = {client.generate("pixtral", f"which version {i}", max_tokens=2).model_version for i in range(6)}
    assert versions == {"2"}  # both servers answer with it


def test_a_server_that_joins_the_name_takes_requests(servers):
    """DNS re-resolution with a resolver the test controls: the name first gives two servers, then three."""
    a, b, c = servers
    answers = [[a.grpc_url, b.grpc_url], [a.grpc_url, b.grpc_url, c.grpc_url]]

    async def resolver(name, port):
        assert (name, port) == ("triton-headless", 8001)
        return answers[0] if len(answers) == 1 else answers.pop(0)

    async def main():
        pool = TritonPool("dns:///triton-headless:8001", TritonBackend, resolver=resolver, resolve_s=0)
        try:
            await pool.probe()
            assert sorted(pool.servers) == sorted([a.grpc_url, b.grpc_url])
            await pool.probe()
            assert sorted(pool.servers) == sorted([a.grpc_url, b.grpc_url, c.grpc_url])
            assert pool.serves("pixtral") and all(server.healthy for server in pool.servers.values())
            params = SamplingParams(max_tokens=2, stream=False)
            messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]

            async def ask(i):
                return [chunk async for chunk in pool.generate("pixtral", messages, [], params, f"dns-{i}")][-1]

            finals = await asyncio.gather(*(ask(i) for i in range(12)))
            assert all(final.finished for final in finals)
        finally:
            await pool.close()

    before = served(c)
    asyncio.run(main())
    assert served(c) - before >= 3  # the newcomer took its share of 12 requests over three servers


def test_killing_a_server_under_load_loses_no_request_that_had_not_begun_and_it_rejoins(servers, gateway):
    a, b, _ = servers
    stop = threading.Event()
    outcomes = {"answered": 0, "failed": [], "streams_cut_after_text": 0}
    lock = threading.Lock()

    def unary_load(client):
        while not stop.is_set():
            try:
                client.generate("pixtral", "keep going", max_tokens=8)
                with lock:
                    outcomes["answered"] += 1
            except grpc.RpcError as error:
                with lock:
                    outcomes["failed"].append(f"{error.code().name}: {error.details()}")

    def stream_load(client):
        while not stop.is_set():
            received = 0
            try:
                for _ in client.stream("pixtral", "stream on", max_tokens=64):
                    received += 1
                with lock:
                    outcomes["answered"] += 1
            except grpc.RpcError as error:
                with lock:
                    if received and error.code() == grpc.StatusCode.UNAVAILABLE:
                        outcomes["streams_cut_after_text"] += 1  # never repeated: the caller decides
                    else:
                        outcomes["failed"].append(f"stream after {received}: {error.code().name}: {error.details()}")

    with VLMClient(gateway.address, api_key=KEY, retries=0, timeout=60) as client:
        workers = [threading.Thread(target=unary_load, args=(client,)) for _ in range(4)]
        workers += [threading.Thread(target=stream_load, args=(client,)) for _ in range(2)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(3)
            os.killpg(a.process.pid, signal.SIGKILL)  # no goodbye: the connection just breaks
            a.process.wait()
            killed_at = time.monotonic()
            # A new request right after the kill is answered (by the other server).
            assert client.generate("pixtral", "right after", max_tokens=2).usage.completion_tokens >= 1
            answered_by = time.monotonic() - killed_at
            time.sleep(3)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
    assert outcomes["failed"] == [] and outcomes["answered"] > 20, outcomes
    # Requests were on the killed server when it died: they were answered by the other one.
    assert '"retrying on another backend"' in gateway.log_path.read_text()
    assert answered_by < 5, answered_by
    assert not backends(gateway)[a.grpc_url].healthy

    a.stop()  # clean up what the kill left (the stubs' cancellation board)
    a.start()
    a.wait_ready(timeout=300)
    deadline = time.monotonic() + 10
    while not backends(gateway)[a.grpc_url].healthy:
        assert time.monotonic() < deadline, "the restarted server did not rejoin"
        time.sleep(0.2)
    with VLMClient(gateway.address, api_key=KEY, retries=0) as client:
        in_parallel(4, lambda i: [client.generate("pixtral", f"back {i}.{j}", max_tokens=2) for j in range(3)])
    assert served(a) >= 3  # counted since its restart
