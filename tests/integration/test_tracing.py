"""One trace from the gateway to generation: a gateway and a Triton of their own (the session's stay
untraced) export to an in-process OTLP collector; one request's spans from the gateway, Triton core
and the Python models arrive under one trace id, each carrying the request id."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import KEY, PNG, make_repository, start_gateway, start_server
from tests.otlp_collector import OtlpCollector
from vlm_client import VLMClient
from vlm_serving.pipelines import pipeline

pytestmark = pytest.mark.integration
# Exports every 100 ms instead of every 5 s (the SDKs and Triton read it alike).
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
MODEL_SPANS = {"preprocess", "encoder cache", "queue wait", "generate"}


@pytest.fixture(scope="module")
def collector():
    with OtlpCollector() as collector:
        yield collector


@pytest.fixture(scope="module")
def traced(tmp_path_factory, checkpoints, collector):
    directory = tmp_path_factory.mktemp("traced")
    server = start_server(make_repository(directory / "model_repository", checkpoints),
                          load_models=(*pipeline("qwen2_5_vl"), "cancel"), otlp_endpoint=collector.endpoint,
                          extra_env=FAST_EXPORT)
    try:
        gateway = start_gateway(server.grpc_url, directory, VLM_OTLP_ENDPOINT=collector.endpoint, **FAST_EXPORT)
        yield gateway
        gateway.stop()
    finally:
        server.stop()


def one_trace(collector: OtlpCollector, request_id: str, expected: set[str]):
    """The spans of the trace whose gateway spans carry `request_id`, once `expected` names are all in it."""

    def trace_of(spans):
        ids = {s.trace_id for s in spans if s.attributes.get("vlm.request_id") == request_id}
        return [s for s in spans if s.trace_id in ids], ids

    def complete(spans):
        found, _ = trace_of(spans)
        return expected <= {s.name for s in found}

    spans, ids = trace_of(collector.wait_for(complete, timeout=20))
    assert len(ids) == 1, f"spans with request id {request_id} in {len(ids)} traces"
    missing = expected - {s.name for s in spans}
    assert not missing, f"missing spans {missing}; got {sorted((s.service, s.name) for s in spans)}"
    return spans


def test_a_grpc_request_is_one_trace_from_the_gateway_to_generation(traced, collector):
    request_id = "trace-grpc-1"
    with VLMClient(traced.address, api_key=KEY, timeout=60) as client:
        answer = client.generate("qwen2.5-vl", "What is in the picture?", [PNG], max_tokens=6, request_id=request_id)
    assert answer.request_id == request_id
    spans = one_trace(collector, request_id, {"/vlm.v1.VisionLanguageService/Generate", "validate", "triton infer",
                                              "qwen2_5_vl", "qwen2_5_vl_generate", *MODEL_SPANS})
    by_name = {s.name: s for s in spans}
    services = {s.service for s in spans}
    assert {"vlm-gateway", "triton", "vlm-models"} <= services
    # The request id on every span: ours as vlm.request_id, Triton's own as the Triton request's id.
    for span in spans:
        if span.service == "triton":
            assert span.name == "InferRequest" or span.attributes.get("triton.request_id", request_id).startswith(request_id)
        else:
            assert span.attributes.get("vlm.request_id") == request_id, (span.service, span.name)
    # Triton's request span is the child of the gateway's Triton call; the models' spans are Triton's children.
    span_ids = {s.span_id: s for s in spans}
    assert span_ids[by_name["InferRequest"].parent_id].name == "triton infer"
    assert all(span_ids[by_name[name].parent_id].service == "triton" for name in MODEL_SPANS)
    cache = by_name["encoder cache"].attributes
    assert (int(cache["vlm.cache.hits"]), int(cache["vlm.cache.misses"])) in {(0, 1), (1, 0)}
    generate = by_name["generate"]
    assert int(generate.attributes["vlm.completion_tokens"]) == answer.usage.completion_tokens == 6
    assert generate.attributes["vlm.finish_reason"] == "length"
    assert "first token" in generate.events


def test_an_http_request_is_traced_from_the_asgi_server(traced, collector):
    client = openai.OpenAI(base_url=f"http://{traced.http_address}/v1", api_key=KEY, max_retries=0, timeout=60)
    request_id = "trace-http-1"
    answer = client.chat.completions.with_raw_response.create(
        model="qwen2.5-vl", max_tokens=3, messages=[{"role": "user", "content": "Say hello"}],
        extra_headers={"x-request-id": request_id})
    assert answer.headers["x-request-id"] == request_id
    spans = one_trace(collector, request_id, {"POST /v1/chat/completions", "validate", "triton infer", "generate"})
    assert {s.service for s in spans} >= {"vlm-gateway", "triton", "vlm-models"}
    assert all(s.attributes.get("vlm.request_id") == request_id for s in spans if s.service != "triton")
