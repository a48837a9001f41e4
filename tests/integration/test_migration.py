"""Stream migration against real Triton servers (issue 29): a server SIGKILLed while it streams an
answer, and the caller's text equals an uninterrupted greedy run (both families, with an image;
model auto, with its route; a JSON Schema answer through the official `openai` SDK); a migration
the deadline leaves no time for is refused, naming why.

Three servers with both families; the request is streamed, and once its first text arrived the
server it is on (the gateway's ListBackends: the one with a request in flight) is killed. The
killed server is started again in the background, so that two servers always serve."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import grpc
import openai
import pytest
from vlm.v1 import vlm_pb2

from tests.conftest import encode, picture
from tests.integration.conftest import KEY, free_ports, make_repository, start_gateway
from vlm_client.client import VLMClient
from vlm_serving.deploy.stack import DEV_ADMIN_API_KEY
from vlm_serving.deploy.triton_server import TritonServer
from vlm_serving.pipelines import pipeline

pytestmark = pytest.mark.integration
MODELS = "qwen2.5-vl=qwen2_5_vl,pixtral=pixtral,auto=auto"
# Long enough that the answer is still streaming when its server is killed after the first text.
MAX_TOKENS = 400
IMAGE = encode(picture(160, 120, seed=3))
# With IMAGE, both tiny random-weight models answer this at length (Pixtral in 325 tokens, then its end token).
PROMPT = "Tell me a long story"
SCHEMA = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                     "minItems": 40, "maxItems": 40}},
          "required": ["words"], "additionalProperties": False}


class Servers:
    """The pool's Triton servers; a killed one is started again on a thread of its own."""

    def __init__(self, servers: list[TritonServer]):
        self.all = servers
        self.restarts: dict[str, threading.Thread] = {}

    def by_address(self, address: str) -> TritonServer:
        return next(server for server in self.all if server.grpc_url == address)

    def kill(self, server: TritonServer) -> None:
        os.killpg(server.process.pid, signal.SIGKILL)  # no goodbye: the connection just breaks
        server.process.wait()

        def restart():
            server.stop()  # clean up what the kill left (the stubs' cancellation board)
            server.start()
            server.wait_ready(timeout=300)

        self.restarts[server.grpc_url] = threading.Thread(target=restart)
        self.restarts[server.grpc_url].start()

    def two_serving(self, gateway) -> None:
        """Wait until the gateway has two healthy servers (restarting ones come back meanwhile)."""
        deadline = time.monotonic() + 300
        while sum(backend.healthy for backend in backends(gateway)) < 2:
            assert time.monotonic() < deadline, "fewer than two servers came back"
            time.sleep(0.2)

    def finish_restarts(self) -> None:
        for thread in self.restarts.values():
            thread.join()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, checkpoints):
    started = []
    try:
        for name in "abc":
            directory = make_repository(tmp_path_factory.mktemp(f"migration-{name}") / "model_repository", checkpoints)
            http, grpc_port, metrics = free_ports(3)
            server = TritonServer(repository=directory, http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                                  log_path=directory.parent / "triton.log",
                                  load_models=(*pipeline("auto"), "cancel"))
            server.start()
            started.append(server)
        for server in started:
            server.wait_ready(timeout=300)
        pool = Servers(started)
        yield pool
        pool.finish_restarts()
    finally:
        for server in started:
            server.stop()


def pool_gateway(servers: Servers, log_dir, **env):
    return start_gateway(",".join(server.grpc_url for server in servers.all), log_dir, VLM_MODELS=MODELS,
                         VLM_ADMIN_API_KEYS=DEV_ADMIN_API_KEY, **env)


@pytest.fixture(scope="module")
def gateway(servers, tmp_path_factory):
    gateway = pool_gateway(servers, tmp_path_factory.mktemp("migration-gateway"))
    yield gateway
    gateway.stop()


def backends(gateway):
    with VLMClient(gateway.address, api_key=DEV_ADMIN_API_KEY) as admin:
        return admin.list_backends(timeout=10)


def kill_the_server_streaming(servers: Servers, gateway) -> str:
    """Kill the server the gateway's one request in flight is on; its address."""
    busy = [backend.address for backend in backends(gateway) if backend.outstanding_requests]
    assert len(busy) == 1, busy
    servers.kill(servers.by_address(busy[0]))
    return busy[0]


def migrations(gateway) -> dict[tuple[str, str], float]:
    """vlm_stream_migrations_total by (model, outcome), from the gateway's metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    counts = {}
    for line in lines:
        if line.startswith("vlm_stream_migrations_total{"):
            labels, value = line[len("vlm_stream_migrations_total{"):].split("} ")
            fields = dict(part.split("=") for part in labels.split(","))
            counts[(fields["model"].strip('"'), fields["outcome"].strip('"'))] = float(value)
    return counts


def stream_text(client: VLMClient, model: str, on_first_text=None, route=None, **request) -> str:
    """The streamed answer's text (`route`: a list the last message's route is put in)."""
    text = []
    for message in client.stream(model, PROMPT, images=[IMAGE], max_tokens=MAX_TOKENS,
                                 temperature=0.0, **request):
        if message.text and not text and on_first_text is not None:
            on_first_text()
        text.append(message.text)
        if route is not None and message.HasField("route"):
            route.append(message.route)
    return "".join(text)


@pytest.mark.parametrize("model, ensemble", [("qwen2.5-vl", "qwen2_5_vl"), ("pixtral", "pixtral")])
def test_a_stream_whose_server_is_killed_goes_on_elsewhere_as_if_uninterrupted(servers, gateway, model, ensemble):
    servers.two_serving(gateway)
    with VLMClient(gateway.address, api_key=KEY, retries=0, timeout=120) as client:
        uninterrupted = stream_text(client, model)
        before = migrations(gateway).get((ensemble, "migrated"), 0)
        killed = []
        migrated = stream_text(client, model, on_first_text=lambda: killed.append(kill_the_server_streaming(servers, gateway)))
    assert killed and len(uninterrupted) > 200
    assert migrated == uninterrupted
    assert migrations(gateway).get((ensemble, "migrated"), 0) == before + 1
    assert f'"failed_backend": "{killed[0]}"' in gateway.log_path.read_text()


def test_a_stream_of_model_auto_goes_on_in_its_answering_family_with_the_route_it_had(servers, gateway):
    """Tiny Qwen2.5-VL's answer is doubtful: Pixtral answers (low confidence) and streams; killed, its
    answer goes on in Pixtral's ensemble on another server, and the route is model auto's."""
    servers.two_serving(gateway)
    with VLMClient(gateway.address, api_key=KEY, retries=0, timeout=120) as client:
        uninterrupted_route, migrated_route = [], []
        uninterrupted = stream_text(client, "auto", route=uninterrupted_route)
        before = migrations(gateway).get(("auto", "migrated"), 0)
        migrated = stream_text(client, "auto", route=migrated_route,
                               on_first_text=lambda: kill_the_server_streaming(servers, gateway))
    assert uninterrupted_route[-1].reason == vlm_pb2.ROUTE_REASON_LOW_CONFIDENCE
    assert migrated == uninterrupted and len(uninterrupted) > 200
    assert migrated_route[-1].reason == uninterrupted_route[-1].reason
    assert [a.model for a in migrated_route[-1].attempts] == [a.model for a in uninterrupted_route[-1].attempts] == [
        "qwen2.5-vl", "pixtral"]
    assert migrations(gateway).get(("auto", "migrated"), 0) == before + 1


def test_a_json_schema_answer_resumes_with_its_grammar_where_the_killed_server_left_it(servers, gateway):
    servers.two_serving(gateway)
    client = openai.OpenAI(base_url=f"http://{gateway.http_address}/v1", api_key=KEY, max_retries=0, timeout=120)
    request = dict(model="qwen2.5-vl", max_tokens=MAX_TOKENS, temperature=0, stream=True,
                   messages=[{"role": "user", "content": "List forty words"}],
                   response_format={"type": "json_schema", "json_schema": {"name": "words", "schema": SCHEMA}})

    def answer(on_first_text=None) -> str:
        text = []
        for event in client.chat.completions.create(**request):
            delta = event.choices[0].delta.content if event.choices else None
            if delta and not text and on_first_text is not None:
                on_first_text()
            text.append(delta or "")
        return "".join(text)

    uninterrupted = answer()
    before = migrations(gateway).get(("qwen2_5_vl", "migrated"), 0)
    migrated = answer(on_first_text=lambda: kill_the_server_streaming(servers, gateway))
    assert len(json.loads(uninterrupted)["words"]) == 40
    assert migrated == uninterrupted
    assert migrations(gateway).get(("qwen2_5_vl", "migrated"), 0) == before + 1


def test_no_migration_when_the_deadline_leaves_too_little_and_the_caller_is_told_why(servers, tmp_path_factory):
    # Every migration needs an hour of deadline left: none has it.
    strict = pool_gateway(servers, tmp_path_factory.mktemp("strict-gateway"), VLM_MIGRATION_RESERVE_S="3600")
    try:
        servers.two_serving(strict)
        with VLMClient(strict.address, api_key=KEY, retries=0, timeout=120) as client:
            uninterrupted = stream_text(client, "pixtral")
            received = []
            with pytest.raises(grpc.RpcError) as failed:
                for message in client.stream("pixtral", PROMPT, images=[IMAGE],
                                             max_tokens=MAX_TOKENS, temperature=0.0):
                    if message.text and not received:
                        kill_the_server_streaming(servers, strict)
                    received.append(message.text)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed after the answer had begun" in failed.value.details()
        assert "its deadline leaves" in failed.value.details() and "3600s" in failed.value.details()
        assert received and uninterrupted.startswith("".join(received))
        assert migrations(strict) == {("pixtral", "refused_deadline"): 1.0}
    finally:
        strict.stop()
