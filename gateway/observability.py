"""Prometheus metrics and JSON logs carrying the request id."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import sys
import time
from contextlib import contextmanager

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import tracing
from gateway.affinity import AFFINITY, LOAD, NO_KEY
from gateway.keys import caller_var

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The gateway's metrics, in a registry of its own (served on the metrics port)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vlm_requests", "Finished RPCs by model, method and status code", ["model", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vlm_request_latency_seconds", "RPC latency", ["model", "method"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "vlm_time_to_first_token_seconds", "Time to the first streamed text", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter("vlm_tokens", "Tokens by model and kind", ["model", "kind"], registry=self.registry)
        self.in_flight = Gauge("vlm_requests_in_flight", "RPCs being served", ["model"], registry=self.registry)
        # Counted once per request model auto answered (its final response; a failed or cancelled
        # request is not). The fallback rate is reasons low_confidence plus fallback_failed (Pixtral
        # was asked again, whether or not it answered) over all of them; fallback_failed and
        # specialist_failed count Pixtral's failed calls.
        self.routed = Counter(
            "vlm_routed_requests", "Requests model auto answered, by route reason; fallback rate: "
            "(low_confidence + fallback_failed) / all", ["reason"], registry=self.registry)
        # By the API key's name (gateway/keys.py; never the key): who uses the service, who is refused.
        self.key_requests = Counter("vlm_key_requests", "Finished RPCs by API key name and status code",
                                    ["key", "code"], registry=self.registry)
        self.quota_refusals = Counter("vlm_quota_refusals", "Requests refused by a key's quota or fair share, "
                                      "by key name and limit", ["key", "limit"], registry=self.registry)
        self.images = Counter("vlm_images", "Images answered about, by model and image kind", ["model", "kind"],
                              registry=self.registry)
        self._children: dict[tuple, object] = {}

    def child(self, metric, *values: str):
        """`metric.labels(*values)`, remembered: labels() takes a lock and rebuilds its key on each
        call, and every request counts itself in about ten series. (As many entries as series.)"""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    @contextmanager
    def track(self, model: str, method: str, key: str = ""):
        """Count the RPC (by model, and by `key`: the caller's key name), time it and keep it in flight;
        the caller sets `outcome["code"]`."""
        outcome = {"code": grpc.StatusCode.OK}
        start = time.perf_counter()
        in_flight = self.child(self.in_flight, model)
        in_flight.inc()
        try:
            yield outcome
        except BaseException:
            if outcome["code"] == grpc.StatusCode.OK:
                outcome["code"] = grpc.StatusCode.CANCELLED
            raise
        finally:
            in_flight.dec()
            self.child(self.latency, model, method).observe(time.perf_counter() - start)
            self.child(self.requests, model, method, outcome["code"].name).inc()
            self.child(self.key_requests, key, outcome["code"].name).inc()

    def count_usage(self, model: str, prompt: int, completion: int, image: int) -> None:
        self.child(self.tokens, model, "prompt").inc(prompt)
        self.child(self.tokens, model, "completion").inc(completion)
        self.child(self.tokens, model, "image").inc(image)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(tracing.log_fields())
        caller = caller_var.get()
        if caller is not None:  # the key's name, never the key
            entry["key"] = caller.name
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    # The JSON lines name no source line, thread or process: a record need not look them up
    # (`_srcfile = None` is logging's own switch for skipping the caller's frame).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_after_answer(logger: logging.Logger, message: str, fields: dict) -> None:
    """An info line written once the request's task yields (its answer on the way), not before:
    formatting and writing a line costs about as much as the rest of a small request's own work
    in the gateway. The line keeps the request's context (its id, key name and trace)."""
    asyncio.get_running_loop().call_soon(functools.partial(logger.info, message, extra={"fields": fields}),
                                         context=contextvars.copy_context())


class PoolCollector:
    """The Triton pool's state at each scrape: `vlm_backend_healthy{backend}` (1 takes requests,
    0 ejected or not live), `vlm_backend_requests_in_flight{backend}` and
    `vlm_routing_decisions_total{reason}` (gateway/affinity.py: affinity, load or no_key)."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        healthy = GaugeMetricFamily("vlm_backend_healthy", "Whether the inference server takes requests",
                                    labels=["backend"])
        in_flight = GaugeMetricFamily("vlm_backend_requests_in_flight",
                                      "Requests this gateway has in flight on the inference server", labels=["backend"])
        for server in self.pool.states():
            healthy.add_metric([server.address], float(server.healthy and not server.retired))
            in_flight.add_metric([server.address], float(server.outstanding))
        yield healthy
        yield in_flight
        decisions = CounterMetricFamily("vlm_routing_decisions", "Requests sent to a server, by why that server "
                                        "(affinity: it holds their keys; load: those that do were over the load "
                                        "bound; no_key: none does)", labels=["reason"])
        for reason in (AFFINITY, LOAD, NO_KEY):
            decisions.add_metric([reason], self.pool.router.decisions[reason])
        yield decisions
