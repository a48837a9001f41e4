"""OpenTelemetry spans inside the Python models, as children of Triton's own spans.

Off unless `VLM_OTLP_ENDPOINT` (an OTLP/HTTP collector, e.g. http://localhost:4318) is in the model
process's environment: `vlm_serving.deploy.triton_server` sets it, with Triton's `--trace-config`
flags, when it starts Triton with an endpoint. Off, `ModelTracing` creates nothing (no SDK, no
exporter thread) and its calls return at once. On, each span's parent is the trace context Triton
hands the request (`request.trace().get_context()`, Triton's OpenTelemetry mode), so preprocessing,
the encoder cache, the queue wait and generation sit in the gateway's trace of the request; each
carries the gateway's request id (`vlm.request_id`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading

from opentelemetry.trace import INVALID_SPAN, Span

REQUEST_ID_ATTRIBUTE = "vlm.request_id"
ENDPOINT_VARIABLE = "VLM_OTLP_ENDPOINT"
SERVICE_NAME = "vlm-models"
# The gateway names its Triton requests "<request id>.<32 hex digits>" (unique per call).
_GATEWAY_TRITON_ID = re.compile(r"(.+)\.[0-9a-f]{32}")
_NO_SPAN = contextlib.nullcontext(INVALID_SPAN)


def gateway_request_id(triton_id: str) -> str:
    """The gateway's request id inside a Triton request id (any other id as it is)."""
    match = _GATEWAY_TRITON_ID.fullmatch(triton_id)
    return match.group(1) if match else triton_id


class ModelTracing:
    """One model process's tracer (`enabled` False: every call is a no-op). `span_processor`: where
    spans go (default: batched to the endpoint over OTLP/HTTP)."""

    def __init__(self, environ=os.environ, span_processor=None):
        endpoint = environ.get(ENDPOINT_VARIABLE, "")
        self.enabled = bool(endpoint)
        if not self.enabled:
            return
        # Imported only when tracing is on: a model that does not trace loads no SDK.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=Resource.create(
            {"service.name": environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME}))
        self.provider.add_span_processor(span_processor or BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")))
        self.tracer = self.provider.get_tracer("vlm_serving")
        self.propagator = TraceContextTextMapPropagator()

    def context(self, request):
        """The request's trace context from Triton (None: tracing is off or Triton does not trace the
        request). Read it while `execute` runs: after it returns Triton may have released the request."""
        if not self.enabled:
            return None
        trace = request.trace()
        text = trace.get_context() if trace is not None else None
        if not text:
            return None
        return self.propagator.extract(json.loads(text))

    def span(self, name: str, request, request_id: str = "", **attributes):
        """A context manager: the span (or a no-op one) around work done for `request` in this thread."""
        if not self.enabled:
            return _NO_SPAN
        return self.tracer.start_as_current_span(name, context=self.context(request),
                                                 attributes=self._attributes(request_id, attributes))

    def start(self, name: str, context, request_id: str = "", **attributes) -> Span:
        """A span under `context` (from `context(request)`) that the caller ends, possibly in another
        thread (the engine's)."""
        if not self.enabled:
            return INVALID_SPAN
        return self.tracer.start_span(name, context=context, attributes=self._attributes(request_id, attributes))

    @staticmethod
    def _attributes(request_id: str, attributes: dict) -> dict:
        return {REQUEST_ID_ATTRIBUTE: gateway_request_id(request_id), **attributes} if request_id else attributes

    def shutdown(self) -> None:
        """Export what is left (a model's `finalize`)."""
        if self.enabled:
            self.provider.shutdown()


class GenerationSpans:
    """A request's "queue wait" (submitted until the engine admits its row) and "generate" (admitted
    until its last token: first token as an event, token counts and finish reason as attributes).
    Called from the engine's thread; a row admitted again after preemption keeps its first spans."""

    def __init__(self, tracing: ModelTracing, request, request_id: str):
        self.tracing, self.context, self.request_id = tracing, tracing.context(request), request_id
        self.queue_wait = tracing.start("queue wait", self.context, request_id)
        self.generate: Span | None = None
        self.first_token = False
        self.refused_at_submission = False
        self.lock = threading.Lock()

    def admitted(self) -> None:
        with self.lock:
            if self.generate is None and not self.refused_at_submission:
                self.queue_wait.end()
                self.generate = self.tracing.start("generate", self.context, self.request_id)

    def refused(self, exc: Exception) -> None:
        """The request never joined the queue (the engine was full, or its parameters were refused):
        its queue wait ends now, with the refusal as its error, and no generation follows."""
        from opentelemetry.trace import Status, StatusCode

        with self.lock:
            self.refused_at_submission = True
            self.queue_wait.set_status(Status(StatusCode.ERROR, str(exc)))
            self.queue_wait.end()

    def update(self, update) -> None:
        self.admitted()  # the static scheduler answers without admitting
        if update.completion_tokens and not self.first_token:  # a whole answer's only update: at its end
            self.generate.add_event("first token")
            self.first_token = True
        if update.finished:
            self.generate.set_attributes({
                "vlm.prompt_tokens": update.prompt_tokens, "vlm.completion_tokens": update.completion_tokens,
                "vlm.cached_tokens": update.cached_tokens, "vlm.finish_reason": update.finish_reason})
            self.generate.end()

    def failed(self, exc: Exception) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.admitted()
        self.generate.set_status(Status(StatusCode.ERROR, str(exc)))
        self.generate.end()
