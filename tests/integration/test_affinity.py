"""Cache-aware routing over three real Triton servers (tiny Pixtral on each, own repository copy, own
ports): questions about one image land on one server, whose encoder cache answers them (read from each
server's own metrics), and spread over the servers once that one holds its share of the load; with
VLM_ROUTING=least_loaded the same questions take turns instead."""

from __future__ import annotations

import re
import threading
import urllib.request

import pytest

from tests.conftest import encode, picture
from tests.integration.conftest import KEY, free_ports, make_repository, start_gateway
from tests.integration.test_pool import PIXTRAL_ONLY, served, served_since
from vlm_client.client import VLMClient
from vlm_serving.deploy.triton_server import TritonServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(tmp_path_factory, checkpoints):
    started = []
    try:
        for name in "abc":
            directory = make_repository(tmp_path_factory.mktemp(f"affinity-{name}") / "model_repository", checkpoints)
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


def gateway_over(servers, log_dir, **env):
    return start_gateway(",".join(server.grpc_url for server in servers), log_dir, VLM_MODELS="pixtral=pixtral", **env)


def metric(url: str, name: str, **labels) -> float:
    """The sum of a metric's samples (with these labels) in Prometheus text from `url`."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        sample = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if sample and all(f'{key}="{value}"' in (sample.group(1) or "") for key, value in labels.items()):
            total += float(sample.group(2))
    return total


def encoder_cache(server: TritonServer) -> tuple[int, int]:
    """(hits, misses) of the server's image-embedding cache, from Triton's metrics endpoint."""
    url = f"http://{server.address}:{server.metrics_port}/metrics"
    return int(metric(url, "vlm_encoder_cache_hits_total")), int(metric(url, "vlm_encoder_cache_misses_total"))


def decisions(gateway, reason: str) -> int:
    return int(metric(f"http://127.0.0.1:{gateway.metrics_port}/metrics", "vlm_routing_decisions_total", reason=reason))


def since(servers, before: list, read) -> list:
    return [tuple(now - then for now, then in zip(read(server), start)) for server, start in zip(servers, before)]


def test_questions_about_one_image_land_on_one_server_and_hit_its_cache(servers, tmp_path):
    gateway = gateway_over(servers, tmp_path)
    document = encode(picture(320, 240, seed=29))
    try:
        with VLMClient(gateway.address, api_key=KEY, retries=0) as client:
            caches, requests = [encoder_cache(s) for s in servers], [served(s) for s in servers]
            for i in range(5):
                assert client.generate("pixtral", f"question {i} about it", [document],
                                       max_tokens=2).usage.completion_tokens >= 1
            shares = served_since(servers, requests, 5)
            assert sorted(shares) == [0, 0, 5], shares
            home = shares.index(5)
            # The home server encoded the image once and found it in its cache four times; nobody else saw it.
            assert since(servers, caches, encoder_cache) == [(4, 1) if i == home else (0, 0) for i in range(3)]
            assert decisions(gateway, "affinity") == 4 and decisions(gateway, "no_key") == 1

            # Ten callers at once about the same image: the home server keeps its share of them
            # (ceil(1.25 x in flight / 3)), the others take the rest.
            requests = [served(s) for s in servers]
            everyone = threading.Barrier(10)

            def ask(i):
                everyone.wait()
                return client.generate("pixtral", f"caller {i}", [document], max_tokens=48).usage.completion_tokens

            results = [0] * 10
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i))) for i in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert all(tokens >= 1 for tokens in results)
            shares = served_since(servers, requests, 10)
            assert sum(1 for share in shares if share) >= 2 and shares[home] < 10, shares
            assert decisions(gateway, "load") >= 1
    finally:
        gateway.stop()


def test_least_loaded_routing_spreads_the_same_questions_and_misses_the_cache(servers, tmp_path):
    gateway = gateway_over(servers, tmp_path, VLM_ROUTING="least_loaded")
    document = encode(picture(320, 240, seed=30))
    try:
        with VLMClient(gateway.address, api_key=KEY, retries=0) as client:
            caches, requests = [encoder_cache(s) for s in servers], [served(s) for s in servers]
            for i in range(6):
                client.generate("pixtral", f"question {i} about it", [document], max_tokens=2)
            assert served_since(servers, requests, 6) == [2, 2, 2]  # idle servers take turns
            # Each server encoded the image once: three misses where affinity has one.
            assert sorted(since(servers, caches, encoder_cache)) == [(1, 1)] * 3
            assert decisions(gateway, "affinity") == decisions(gateway, "no_key") == 0
    finally:
        gateway.stop()
