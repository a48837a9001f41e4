"""Model `auto` on the real stack: routing by image kind, the confidence fallback, streams,
cancellation, Qwen's answer when Pixtral's call fails, and the same text as calling the chosen
model directly."""

from __future__ import annotations

import io
import time
import urllib.request

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vlm.v1 import vlm_pb2

from tests.conftest import encode, picture
from tests.integration.conftest import KEY, make_repository, start_gateway, start_server
from vlm_client import VLMClient, build_request
from vlm_serving.ensemble_client import generate, user_message
from vlm_serving.pipelines import pipeline

pytestmark = pytest.mark.integration
PHOTO = encode(picture(320, 240, seed=5))  # random pixels: a photo's statistics
PROMPT = "What does this show?"


def chart_png() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    axes.plot(range(12), [v * v for v in range(12)], marker="o")
    axes.set(title="Requests per hour", xlabel="hour", ylabel="requests")
    data = io.BytesIO()
    figure.savefig(data, format="png")
    plt.close(figure)
    return data.getvalue()


CHART = chart_png()


@pytest.fixture(scope="module")
def client(gateway):
    with VLMClient(gateway.address, api_key=KEY, timeout=120) as client:
        yield client


def routed(client, image, stream=False, threshold=None, fallback=True, max_tokens=12):
    request = build_request("auto", PROMPT, [image], max_tokens=max_tokens)
    if threshold is not None:
        request.routing.confidence_threshold = threshold
    request.routing.disable_fallback = not fallback
    if stream:
        return list(client.stub.GenerateStream(request, metadata=client.metadata, timeout=120))
    return client.stub.Generate(request, metadata=client.metadata, timeout=120)


def attempts(answer):
    return [a.model for a in answer.route.attempts]


def test_a_chart_goes_to_pixtral_by_kind_and_says_why(client):
    answer = routed(client, CHART)
    assert (answer.model, answer.route.reason, attempts(answer)) == ("pixtral", vlm_pb2.ROUTE_REASON_IMAGE_KIND, ["pixtral"])
    assert [image.kind for image in answer.route.images] == [vlm_pb2.IMAGE_KIND_DIAGRAM]
    assert answer.text == client.generate("pixtral", PROMPT, [CHART], max_tokens=12).text


def test_a_photo_with_the_fallback_off_stays_on_qwen(client):
    answer = routed(client, PHOTO, fallback=False)
    assert (answer.model, answer.route.reason, attempts(answer)) == ("qwen2.5-vl", vlm_pb2.ROUTE_REASON_DEFAULT, ["qwen2.5-vl"])
    assert answer.text == client.generate("qwen2.5-vl", PROMPT, [PHOTO], max_tokens=12).text


def test_below_the_threshold_pixtral_answers_again_and_both_attempts_are_listed(client):
    answer = routed(client, PHOTO, threshold=0.0)  # no answer is certain: always below
    assert (answer.model, answer.route.reason, attempts(answer)) == (
        "pixtral", vlm_pb2.ROUTE_REASON_LOW_CONFIDENCE, ["qwen2.5-vl", "pixtral"])
    qwen = client.generate("qwen2.5-vl", PROMPT, [PHOTO], max_tokens=12)
    pixtral = client.generate("pixtral", PROMPT, [PHOTO], max_tokens=12)
    assert answer.text == pixtral.text
    first, second = answer.route.attempts
    assert first.confidence == pytest.approx(qwen.confidence, abs=1e-5) and first.completion_tokens == 12
    assert second.confidence == pytest.approx(answer.confidence) == pytest.approx(pixtral.confidence, abs=1e-5)


def test_above_the_threshold_qwens_answer_is_kept(client):
    answer = routed(client, PHOTO, threshold=-100.0)
    assert (answer.model, answer.route.reason, attempts(answer)) == ("qwen2.5-vl", vlm_pb2.ROUTE_REASON_DEFAULT, ["qwen2.5-vl"])
    assert answer.text == client.generate("qwen2.5-vl", PROMPT, [PHOTO], max_tokens=12).text


def test_streams_by_kind_and_after_a_fallback_stream_and_a_held_answer_comes_whole(client):
    by_kind = routed(client, CHART, stream=True)
    assert len(by_kind) > 1 and {m.model for m in by_kind} == {"pixtral"}
    assert "".join(m.text for m in by_kind) == routed(client, CHART).text
    assert by_kind[-1].route.reason == vlm_pb2.ROUTE_REASON_IMAGE_KIND
    fell_back = routed(client, PHOTO, stream=True, threshold=0.0)
    assert len(fell_back) > 1 and fell_back[-1].route.reason == vlm_pb2.ROUTE_REASON_LOW_CONFIDENCE
    assert "".join(m.text for m in fell_back) == routed(client, PHOTO, threshold=0.0).text
    held = routed(client, PHOTO, stream=True, threshold=-100.0)
    assert len(held) == 1 and held[0].route.reason == vlm_pb2.ROUTE_REASON_DEFAULT
    assert held[0].text == routed(client, PHOTO, threshold=-100.0).text
    unheld = routed(client, PHOTO, stream=True, fallback=False)
    assert len(unheld) > 1 and "".join(m.text for m in unheld) == held[0].text


# Prompts that run long on each tiny model with that image (found by trying; Pixtral's ends at 608).
@pytest.mark.parametrize("image,family,prompt", [(PHOTO, "qwen2.5-vl", "Tell me a long story"),
                                                 (CHART, "pixtral", "Tell long please")])
def test_a_cancelled_routed_stream_frees_its_row(client, image, family, prompt):
    """Cancelled while Qwen's held answer runs, or while Pixtral streams: the row is freed, so a
    short request to that model answers at once, not after the long one."""
    long = dict(max_tokens=3000)
    started = time.perf_counter()
    whole = client.generate(family, prompt, [image], **long)
    uncancelled = time.perf_counter() - started
    assert whole.usage.completion_tokens >= 600, "this prompt must run long on the tiny model"
    request = build_request("auto", prompt, [image], **long)
    request.routing.confidence_threshold = 0.0
    stream = client.stub.GenerateStream(request, metadata=client.metadata, timeout=60)
    if family == "pixtral":
        assert next(stream).model == "pixtral"
    else:
        time.sleep(0.5)  # Qwen's answer is held: nothing arrives before it completes
    stream.cancel()
    started = time.perf_counter()
    client.generate(family, "short", max_tokens=4)
    assert time.perf_counter() - started < uncancelled / 3


def test_auto_answers_triton_callers_too_with_its_route(triton):
    """The router is a Triton model: perf_analyzer or tritonclient drive it like an ensemble."""
    result = generate(triton.grpc_url, "auto", user_message(PROMPT, 1), [CHART], max_tokens=6)
    assert result.route["reason"] == "image_kind" and [a["family"] for a in result.route["attempts"]] == ["pixtral"]
    assert result.images[0]["kind"] == "diagram" and result.completion_tokens == 6


def test_a_bad_image_through_auto_gets_the_familys_own_error(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate("auto", PROMPT, [b"GIF89a" + b"\0" * 40], max_tokens=4)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot read the GIF header" in caught.value.details()


def test_vlm_generate_with_model_auto_answers_a_chart_from_pixtral_and_says_why(gateway, tmp_path):
    import os
    import subprocess
    import sys

    chart = tmp_path / "chart.png"
    chart.write_bytes(CHART)
    result = subprocess.run(
        [sys.executable, "-m", "vlm_client.cli", "--address", gateway.address, "generate", "--model", "auto",
         "--image", str(chart), "What does the chart show?", "--max-tokens", "8"],
        env=dict(os.environ, VLM_API_KEY=KEY), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "[model=pixtral " in result.stderr and " route=image_kind:pixtral(" in result.stderr
    assert " images=diagram@" in result.stderr


def test_a_routed_request_past_its_deadline_is_deadline_exceeded_and_frees_qwens_row(client):
    started = time.perf_counter()
    client.generate("qwen2.5-vl", "Tell me a long story", [PHOTO], max_tokens=3000)
    uncancelled = time.perf_counter() - started
    request = build_request("auto", "Tell me a long story", [PHOTO], max_tokens=3000)
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Generate(request, metadata=client.metadata, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.perf_counter()
    client.generate("qwen2.5-vl", "short", max_tokens=4)
    assert time.perf_counter() - started < uncancelled / 3


def test_metrics_count_routes_by_reason_and_images_by_kind(client, gateway):
    import re

    def counts() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).read().decode()
        return {name: float(value) for name, value in re.findall(r"^(vlm_(?:routed_requests|images)_total\{[^}]*\}) (\S+)$",
                                                                  text, re.M)}

    before = counts()
    routed(client, CHART)
    routed(client, PHOTO, threshold=0.0)
    after = counts()

    def grew(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('vlm_routed_requests_total{reason="image_kind"}') == 1
    assert grew('vlm_routed_requests_total{reason="low_confidence"}') == 1
    assert grew('vlm_images_total{kind="diagram",model="auto"}') == 1
    assert grew('vlm_images_total{kind="photo",model="auto"}') == 1


@pytest.fixture(scope="module")
def failing_pixtral(tmp_path_factory, checkpoints):
    """A stack of its own whose Pixtral refuses every request: its generation step's key/value-cache
    budget is cut to 16 token slots (what a request meets that fits Qwen2.5-VL's limits but not
    Pixtral's), while Pixtral stays loaded and ready, so the gateway routes to `auto` as usual."""
    root = tmp_path_factory.mktemp("failing-pixtral")
    repository = make_repository(root / "model_repository", checkpoints)
    config = repository / "pixtral_generate" / "config.pbtxt"
    budget = '"cache_tokens" value: { string_value: "65536" }'
    assert budget in config.read_text()
    config.write_text(config.read_text().replace(budget, '"cache_tokens" value: { string_value: "16" }'))
    triton = start_server(repository, load_models=(*pipeline("auto"), "cancel"))
    try:
        gateway = start_gateway(triton.grpc_url, root)
    except BaseException:
        triton.stop()
        raise
    yield triton, gateway
    gateway.stop()
    triton.stop()


# (image, threshold, reason, the attempts' models in order): a doubtful Qwen answer whose fallback
# fails, and a chart that Pixtral would answer.
PIXTRAL_FAILS = [(PHOTO, 0.0, vlm_pb2.ROUTE_REASON_FALLBACK_FAILED, ["qwen2.5-vl", "pixtral"]),
                 (CHART, None, vlm_pb2.ROUTE_REASON_SPECIALIST_FAILED, ["pixtral", "qwen2.5-vl"])]


def test_when_pixtral_fails_qwen_answers_and_the_route_says_why(failing_pixtral):
    _, gateway = failing_pixtral
    with VLMClient(gateway.address, api_key=KEY, timeout=120) as client:
        for image, threshold, reason, models in PIXTRAL_FAILS:
            qwen = client.generate("qwen2.5-vl", PROMPT, [image], max_tokens=12).text
            answer = routed(client, image, threshold=threshold)
            streamed = routed(client, image, stream=True, threshold=threshold)
            for final in (answer, streamed[-1]):
                assert (final.model, final.route.reason, attempts(final)) == ("qwen2.5-vl", reason, models)
                errors = {attempt.model: attempt.error for attempt in final.route.attempts}
                assert errors["qwen2.5-vl"] == "" and "key/value-cache budget of 16 tokens" in errors["pixtral"]
            assert answer.text == qwen and "".join(m.text for m in streamed) == qwen
            assert {m.model for m in streamed} == {"qwen2.5-vl"}
            # A held answer (the fallback was possible) comes whole; a chart's answer streams from Qwen.
            assert len(streamed) == 1 if reason == vlm_pb2.ROUTE_REASON_FALLBACK_FAILED else len(streamed) > 1
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).read().decode()
    for reason in ("fallback_failed", "specialist_failed"):
        assert f'vlm_routed_requests_total{{reason="{reason}"}} 2.0' in metrics


def health(gateway, model: str) -> int:
    with grpc.insecure_channel(gateway.address) as channel:
        service = f"vlm.v1.VisionLanguageService/{model}"
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_with_pixtral_unloaded_auto_answers_with_qwen_and_stays_ready(failing_pixtral):
    """Pixtral's ensemble unloaded (a refusal that did no work): Triton's callers reach `auto` directly,
    and the gateway keeps `auto` ready and routed (it needs only itself and Qwen2.5-VL)."""
    triton, gateway = failing_pixtral
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    client.unload_model("pixtral")
    try:
        deadline = time.monotonic() + 30
        while any(m.name == "pixtral" and m.state == "READY" for m in client.get_model_repository_index().models):
            assert time.monotonic() < deadline, "pixtral did not unload within 30 s"
            time.sleep(0.2)
        for image, threshold, reason, models in PIXTRAL_FAILS:
            for stream in (False, True):
                result = generate(triton.grpc_url, "auto", user_message(PROMPT, 1), [image], max_tokens=6,
                                  confidence_threshold=threshold, stream=stream)
                expected = vlm_pb2.RouteReason.Name(reason).removeprefix("ROUTE_REASON_").lower()
                assert (result.route["family"], result.route["reason"]) == ("qwen2_5_vl", expected)
                assert [a["family"] for a in result.route["attempts"]] == [
                    {"qwen2.5-vl": "qwen2_5_vl", "pixtral": "pixtral"}[model] for model in models]
                errors = {a["family"]: a["error"] for a in result.route["attempts"]}
                assert errors["qwen2_5_vl"] == "" and "Model 'pixtral' is not ready" in errors["pixtral"]
                qwen = generate(triton.grpc_url, "qwen2_5_vl", user_message(PROMPT, 1), [image], max_tokens=6)
                assert result.text == qwen.text and result.completion_tokens == 6
        deadline = time.monotonic() + 30  # the gateway probes every 0.5 s (VLM_HEALTH_POLL_S)
        while health(gateway, "pixtral") == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the gateway did not see pixtral unloaded within 30 s"
            time.sleep(0.2)
        assert health(gateway, "auto") == health(gateway, "qwen2.5-vl") == health_pb2.HealthCheckResponse.SERVING
        with VLMClient(gateway.address, api_key=KEY, timeout=120) as vlm:
            ready = {model.name: model.ready for model in vlm.list_models()}
            assert ready == {"auto": True, "qwen2.5-vl": True, "pixtral": False}
            answer = routed(vlm, CHART)
            assert (answer.model, answer.route.reason, attempts(answer)) == (
                "qwen2.5-vl", vlm_pb2.ROUTE_REASON_SPECIALIST_FAILED, ["pixtral", "qwen2.5-vl"])
    finally:
        client.load_model("pixtral")
