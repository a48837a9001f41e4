"""OpenTelemetry traces of the gateway's requests, exported by OTLP/HTTP; off unless an endpoint is set.

`VLM_OTLP_ENDPOINT` (a collector's base URL, e.g. http://localhost:4318; spans go to its
/v1/traces), or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
switches it on; the other standard variables apply as the SDK reads them (`OTEL_SERVICE_NAME`,
default "vlm-gateway"; `OTEL_TRACES_SAMPLER` and `_ARG`, default: every request, or as the
caller's `traceparent` says; `OTEL_BSP_*`). Off, nothing is set up: no SDK, no exporter thread,
no interceptor or middleware, and `span()` returns a shared no-op.

On: the gRPC server's and the HTTP API's own spans (the maintained instrumentations), and inside
them "validate", "fetch media" and "triton infer"; every span carries the request id
(`vlm.request_id`), and log lines carry the trace id. The Triton call sends the W3C `traceparent`
as gRPC metadata, so Triton's spans and the models' (vlm_serving/tracing.py) join the trace.
"""

from __future__ import annotations

import contextlib
import os

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN

REQUEST_ID_ATTRIBUTE = "vlm.request_id"
SERVICE_NAME = "vlm-gateway"
ENDPOINT_VARIABLES = ("VLM_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# Probes and reflection are not requests: untraced.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
_NO_SPAN = contextlib.nullcontext(INVALID_SPAN)
_tracer: trace.Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def configure(environ=os.environ) -> bool:
    """Set up the SDK once per process when an endpoint is configured; whether tracing is on."""
    global _tracer
    if _tracer is not None or not any(environ.get(name) for name in ENDPOINT_VARIABLES):
        return _tracer is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create(
        {"service.name": environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME}))
    from gateway.observability import request_id_var  # (observability imports this module)

    provider.add_span_processor(_request_id_processor(request_id_var))
    base = environ.get("VLM_OTLP_ENDPOINT")
    # Without VLM_OTLP_ENDPOINT the exporter reads the OTEL_EXPORTER_OTLP_* variables itself.
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"{base.rstrip('/')}/v1/traces" if base else None)))
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("gateway")
    return True


def shutdown() -> None:
    """Export the spans still buffered (the gateway's stop)."""
    if _tracer is not None:
        trace.get_tracer_provider().shutdown()


def _request_id_processor(request_id_var):
    """A span processor: spans started once the request id is known carry it."""
    from opentelemetry.sdk.trace import SpanProcessor

    class RequestIdOnSpans(SpanProcessor):
        def on_start(self, span, parent_context=None) -> None:
            request_id = request_id_var.get()
            if request_id:
                span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)

    return RequestIdOnSpans()


def server_interceptors() -> list:
    """The gRPC server's tracing interceptor (first: refusals are traced too); none when off."""
    if _tracer is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.any_of(
        *(filters.service_name(name) for name in UNTRACED_SERVICES))))]


def asgi(app):
    """The HTTP API wrapped in OpenTelemetry's ASGI middleware (unchanged when off)."""
    if _tracer is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    # Per-message send/receive spans say nothing a request's span does not.
    return OpenTelemetryMiddleware(app, excluded_urls="/health", exclude_spans=["receive", "send"])


def span(name: str):
    """A child span of the current one around a step of the request (a no-op when off)."""
    return _NO_SPAN if _tracer is None else _tracer.start_as_current_span(name)


def tag_request(request_id: str) -> None:
    """Put the request id, once known, on the span the request arrived with (the server's)."""
    if _tracer is not None:
        trace.get_current_span().set_attribute(REQUEST_ID_ATTRIBUTE, request_id)


def trace_headers() -> list[tuple[str, str]]:
    """The current span's W3C trace context as gRPC metadata ([] when off or unsampled)."""
    if _tracer is None or not trace.get_current_span().get_span_context().trace_flags.sampled:
        return []
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return list(carrier.items())


def log_fields() -> dict[str, str]:
    """The current trace's id for a log line ({} when off or outside a span)."""
    if _tracer is None:
        return {}
    context = trace.get_current_span().get_span_context()
    return {"trace_id": trace.format_trace_id(context.trace_id)} if context.is_valid else {}
