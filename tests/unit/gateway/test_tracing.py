"""Tracing is off unless an OTLP endpoint is set: then nothing is set up and a request pays next to nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from gateway import tracing
from vlm_serving.tracing import GenerationSpans, ModelTracing, gateway_request_id

# In a fresh interpreter: what the gateway and a model set up with no endpoint in the environment.
UNCONFIGURED = textwrap.dedent("""
    import json, sys, threading
    import gateway.server
    from gateway import tracing
    from vlm_serving.tracing import ModelTracing
    on = tracing.configure({})
    model = ModelTracing({})
    print(json.dumps({"gateway": on, "model": model.enabled, "threads": threading.active_count(),
                      "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")),
                      "interceptors": len(tracing.server_interceptors())}))
""")


def test_without_an_endpoint_nothing_is_set_up():
    output = subprocess.run([sys.executable, "-c", UNCONFIGURED], capture_output=True, text=True, check=True).stdout
    state = json.loads(output.strip().splitlines()[-1])
    assert state == {"gateway": False, "model": False, "threads": 1, "sdk": [], "interceptors": 0}


def test_without_an_endpoint_a_request_pays_next_to_nothing():
    assert not tracing.enabled()
    app = object()
    assert tracing.asgi(app) is app and tracing.trace_headers() == [] and tracing.log_fields() == {}
    model = ModelTracing({})
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):  # what one request does: the gateway's three spans and the models' four
        for name in ("validate", "fetch media", "triton infer"):
            with tracing.span(name) as span:
                span.set_attribute(tracing.REQUEST_ID_ATTRIBUTE, "r")
        tracing.tag_request("r")
        tracing.trace_headers()
        with model.span("preprocess", None, "r"):
            pass
        model.start("encoder cache", model.context(None), "r").end()
    per_request = (time.perf_counter() - started) / rounds
    # About 1.4 µs here; the OpenTelemetry API's own no-op tracer (what an always-installed
    # instrumentation costs without an SDK) took 20 µs for the same spans.
    assert per_request < 8e-6, f"{per_request * 1e6:.1f} µs per request with tracing off"


class FakeTrace:
    def __init__(self, context):
        self.context = context

    def get_context(self):
        return self.context


class FakeRequest:
    """What the Python backend hands a model: `trace()`, whose context is Triton's JSON text."""

    def __init__(self, context):
        self._trace = FakeTrace(context)

    def trace(self):
        return self._trace


def test_model_spans_join_the_trace_triton_hands_over():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exported = InMemorySpanExporter()
    model = ModelTracing({"VLM_OTLP_ENDPOINT": "http://127.0.0.1:9"}, SimpleSpanProcessor(exported))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = FakeRequest(json.dumps({"traceparent": parent}))
    spans = GenerationSpans(model, request, f"my-request.{'a' * 32}")
    request._trace = None  # released by Triton once `execute` returned: the spans read it before
    spans.admitted()
    spans.admitted()  # admitted again after a preemption: one queue wait, one generation
    update = type("Update", (), dict(completion_tokens=1, finished=False, prompt_tokens=9, cached_tokens=0,
                                     finish_reason=""))
    spans.update(update)
    update.completion_tokens, update.finished, update.finish_reason = 4, True, "stop"
    spans.update(update)
    with model.span("preprocess", FakeRequest(None), "other"):
        pass
    by_name = {span.name: span for span in exported.get_finished_spans()}
    assert sorted(by_name) == ["generate", "preprocess", "queue wait"]
    for name in ("queue wait", "generate"):
        assert format(by_name[name].context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
        assert format(by_name[name].parent.span_id, "016x") == "b7ad6b7169203331"
        assert by_name[name].attributes["vlm.request_id"] == "my-request"
    generate = by_name["generate"]
    assert [event.name for event in generate.events] == ["first token"]
    assert (generate.attributes["vlm.completion_tokens"], generate.attributes["vlm.finish_reason"]) == (4, "stop")
    assert by_name["preprocess"].parent is None  # Triton did not trace that request: a trace of its own
    model.provider.shutdown()


def test_the_gateway_request_id_is_read_from_tritons():
    assert gateway_request_id(f"abc.def.{'0' * 32}") == "abc.def"
    assert gateway_request_id("someone-elses-id") == "someone-elses-id"


def test_a_request_refused_at_submission_ends_its_queue_wait_with_the_refusal():
    """An engine full (or a refused parameter) answers the request before it queues: its queue wait
    is exported, ended with the refusal, and no generation span follows."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from vlm_serving.generation.engine import EngineFull

    exported = InMemorySpanExporter()
    model = ModelTracing({"VLM_OTLP_ENDPOINT": "http://127.0.0.1:9"}, SimpleSpanProcessor(exported))
    request = FakeRequest(json.dumps({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}))
    spans = GenerationSpans(model, request, f"my-request.{'b' * 32}")
    spans.refused(EngineFull("the generation queue is full"))
    spans.admitted()  # nothing more: the request never ran
    (queue_wait,) = exported.get_finished_spans()
    assert queue_wait.name == "queue wait" and queue_wait.status.status_code == StatusCode.ERROR
    assert "queue is full" in queue_wait.status.description
    model.provider.shutdown()
