"""An in-process OTLP/HTTP trace collector for tests: `POST /v1/traces` with a protobuf
`ExportTraceServiceRequest` (what the gateway's and the models' SDK exporters and Triton's own
OpenTelemetry exporter send), the spans kept in a list."""

from __future__ import annotations

import gzip
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict
    events: list[str]


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpCollector:
    def __init__(self):
        self.spans: list[CollectedSpan] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.headers.get("content-type") == "application/json":  # Triton's exporter: OTLP/JSON
                    collector._collect_json(json.loads(body))
                else:
                    collector._collect(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def _collect(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(CollectedSpan(
                        service=str(resource.get("service.name", "")), name=span.name,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        events=[event.name for event in span.events]))
        with self.lock:
            self.spans.extend(spans)

    def _collect_json(self, request: dict) -> None:
        """OTLP/JSON: the same messages, ids in hex, values as {"stringValue": ...} and so on."""
        def values(attributes):
            return {a["key"]: next(iter(a["value"].values()), None) for a in attributes}

        spans = []
        for resource_spans in request.get("resourceSpans", []):
            resource = values(resource_spans.get("resource", {}).get("attributes", []))
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    spans.append(CollectedSpan(
                        service=str(resource.get("service.name", "")), name=span["name"],
                        trace_id=span["traceId"].lower(), span_id=span["spanId"].lower(),
                        parent_id=span.get("parentSpanId", "").lower(), attributes=values(span.get("attributes", [])),
                        events=[event["name"] for event in span.get("events", [])]))
        with self.lock:
            self.spans.extend(spans)

    def wait_for(self, condition, timeout: float) -> list[CollectedSpan]:
        """The spans once `condition(spans)` holds (exporters send in batches, each on its own clock)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if condition(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)

    def __enter__(self) -> "OtlpCollector":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
