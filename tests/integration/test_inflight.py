"""In-flight batching on the real stack (gateway -> Triton -> the generation engine)."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc
import pytest

from tests.integration.conftest import KEY, PNG, make_repository, start_gateway, start_server
from vlm_client import VLMClient, build_request

pytestmark = pytest.mark.integration
LONG_PROMPT = "a very long answer"  # the tiny Qwen runs 2,000 tokens on it without an end token
# ... and 4,000 on this one (tests/integration/test_gateway.py).
LONGER = dict(prompt="Tell me a long story", max_tokens=3900)


def engine_metric(server, name: str, model: str = "qwen2_5_vl_generate") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not on Triton's metrics endpoint"
    return float(match.group(1))


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def raw_generate(client: VLMClient, prompt: str, max_tokens: int, timeout: float = 120):
    """Generate without the client's retries: the status the gateway answered."""
    return client.stub.Generate(build_request("qwen2.5-vl", prompt, max_tokens=max_tokens),
                                metadata=client.metadata, timeout=timeout)


def test_a_short_request_finishes_while_a_2000_token_request_runs(gateway):
    finished: list[str] = []
    with VLMClient(gateway.address, api_key=KEY, timeout=300) as client:
        stream = client.stream("qwen2.5-vl", LONG_PROMPT, max_tokens=2000)
        next(stream)  # the long request is generating
        short = client.generate("qwen2.5-vl", "short", [PNG], max_tokens=5)
        finished.append("short")
        *_, last = stream
        finished.append("long")
    assert finished == ["short", "long"]
    assert short.usage.completion_tokens == 5 and last.usage.completion_tokens == 2000


@pytest.fixture(scope="module")
def one_row_stack(tmp_path_factory, checkpoints):
    """A stack whose generation instances run one row, hold one waiting request and a small cache."""
    from vlm_serving.generation.scheduling import EngineLimits

    directory = tmp_path_factory.mktemp("one_row")
    repository = make_repository(directory / "model_repository", checkpoints,
                                 engine=EngineLimits(max_running=1, cache_tokens=4000, max_waiting=1))
    server = start_server(repository)
    gateway = start_gateway(server.grpc_url, directory)
    yield server, gateway
    gateway.stop()
    server.stop()


def test_queue_overflow_is_resource_exhausted_and_a_cancelled_row_frees_its_slot(one_row_stack):
    server, gateway = one_row_stack
    with VLMClient(gateway.address, api_key=KEY, timeout=300) as client:
        running = client.stub.GenerateStream(build_request("qwen2.5-vl", **LONGER),
                                             metadata=client.metadata, timeout=300)
        next(running)
        waiting_result = {}
        waiting = threading.Thread(target=lambda: waiting_result.update(answer=raw_generate(client, "waiting", 6)))
        waiting.start()
        wait_for(lambda: engine_metric(server, "vlm_engine_waiting") == 1)
        with pytest.raises(grpc.RpcError) as refused:
            raw_generate(client, "one too many", 4)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert "at capacity" in refused.value.details()
        assert waiting.is_alive(), "the waiting request waits while the only row runs"
        running.cancel()
        waiting.join(timeout=60)
        assert waiting_result["answer"].usage.completion_tokens == 6
        wait_for(lambda: engine_metric(server, "vlm_engine_running") == 0)
        decoded = engine_metric(server, "vlm_engine_decode_tokens_total")
        assert decoded < 3000, "the cancelled row stopped long before its 3,900 tokens"
        assert engine_metric(server, "vlm_engine_cached_tokens_total") >= 16, \
            "the later prompts reused the first one's block of the chat template's system prompt"


def test_a_request_beyond_the_cache_budget_is_invalid_argument_naming_it(one_row_stack):
    _, gateway = one_row_stack
    with VLMClient(gateway.address, api_key=KEY, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as refused:
            raw_generate(client, "too long", 4000)  # 45 prompt tokens: within the context of 4,096
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key/value-cache budget of 4000 tokens" in refused.value.details()
