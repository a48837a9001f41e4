"""Wire the gateway: servicer, auth, health, reflection, metrics; run until stopped.

    VLM_API_KEYS=dev-local-key python -m gateway
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway.admin import ModelAdminServicer
from gateway.affinity import AffinityRouter
from gateway.auth import PUBLIC_METHODS, AuthInterceptor
from gateway.keys import KeyRing, env_entries
from gateway.migration import MigrationPolicy
from gateway.observability import Metrics, PoolCollector, configure_logging
from gateway.servicer import VisionLanguageServicer
from gateway.settings import Settings
from gateway import tracing
from gateway.tls import CertificateFiles, channel_credentials
from gateway.triton_backend import TritonBackend
from gateway.triton_pool import TritonPool

log = logging.getLogger("gateway")
SERVICE_NAME = vlm_pb2.DESCRIPTOR.services_by_name["VisionLanguageService"].full_name
ADMIN_SERVICE_NAME = vlm_pb2.DESCRIPTOR.services_by_name["ModelAdminService"].full_name
REFLECTION_METHODS = frozenset({f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"})
ADMIN_METHODS = frozenset(
    f"/{ADMIN_SERVICE_NAME}/{method.name}"
    for method in vlm_pb2.DESCRIPTOR.services_by_name["ModelAdminService"].methods
)


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    backend: TritonPool
    health: health.aio.HealthServicer
    metrics: Metrics
    metrics_http: object  # prometheus_client's HTTP server
    health_watcher: asyncio.Task
    servicer: VisionLanguageServicer
    readiness: "Readiness"
    http: "HttpServer | None" = None

    @property
    def metrics_port(self) -> int:
        return self.metrics_http.server_port

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    async def drain(self, grace: float) -> None:
        """A rolling update's stop, moving clients rather than refusing them: health says NOT_SERVING
        and every connection is told to go at once (gRPC: GOAWAY, so clients open new connections, to
        another replica; HTTP: the listener closes, idle keep-alive connections close and busy ones
        close after their answer). Requests in flight get up to `grace` seconds to finish; then the
        rest are cancelled (their generation rows freed in Triton) and everything closes."""
        self.health_watcher.cancel()
        self.readiness.draining = True
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"fields": {"in_flight": self.servicer.in_flight, "grace_s": grace}})
        await self.stop(grace)

    async def stop(self, grace: float = 5.0) -> None:
        self.health_watcher.cancel()
        # The servers' own grace outlasts ours by a margin: the servicer ends what is left itself
        # (UNAVAILABLE), so the servers never cancel a request they are answering.
        margin = 5.0
        stopping = asyncio.gather(self.server.stop(grace + margin),
                                  self.http.stop(grace + margin) if self.http else asyncio.sleep(0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.servicer.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.servicer.in_flight:
            log.warning("grace period over: ending the requests left", extra={"fields": {
                "ended": self.servicer.in_flight}})
            self.servicer.end_remaining()
        await stopping
        await self.backend.close()
        tracing.shutdown()
        self.metrics_http.shutdown()
        self.metrics_http.server_close()


class Readiness:
    """Whether this replica can serve (read by the HTTP API's /health): some model serves (or every
    one of the required set does) and it is not draining. Set by `watch_health` and `drain`."""

    def __init__(self):
        self.serving = False
        self.draining = False

    def __call__(self) -> bool:
        return self.serving and not self.draining


class _UvicornServer(uvicorn.Server):
    """uvicorn's Server without its signal handling: the gateway owns SIGINT and SIGTERM (uvicorn
    takes them over while it serves and re-raises them after it stops, which killed the process
    in the middle of its drain)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The OpenAI-compatible API on uvicorn, in the gRPC server's event loop."""

    def __init__(self, app, address: str, tls: CertificateFiles | None = None):
        host, _, port = address.rpartition(":")
        # httptools: the C HTTP parser (h11, the pure-Python one, cost a tenth of the throughput).
        protocol, tls_options = HttpToolsProtocol, {}
        if tls is not None:  # a context that follows the files (uvicorn's own would load them once)
            reloading = tls.ssl_context()
            protocol = reloading.protocol(HttpToolsProtocol)
            tls_options["ssl_context_factory"] = lambda config, default: reloading.context
        self.config = uvicorn.Config(app, host=host or "localhost", port=int(port), log_level="warning",
                                     lifespan="off", access_log=False, http=protocol, **tls_options)
        self.server = _UvicornServer(self.config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it could not start
                raise OSError("the HTTP server stopped before it started")
            await asyncio.sleep(0.02)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Close the listener and idle connections now; answers in flight get `grace` seconds."""
        self.config.timeout_graceful_shutdown = max(grace, 0.05)  # 0 would time out even with nothing to wait for
        self.server.should_exit = True
        if self.task:
            await self.task


async def watch_health(settings: Settings, backend: TritonPool, servicer: health.aio.HealthServicer,
                       readiness: Readiness | None = None) -> None:
    """Probes the inference servers every few seconds. Each model's own health service
    (`vlm.v1.VisionLanguageService/<model>`) says whether it serves; the overall one ("" and the
    service's name: what readiness probes ask) says SERVING while this replica can serve: while any
    model serves, or, with `required_models` set, while every one of them does. One model's outage
    never takes the replica out of a load balancer while other models answer."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    last = None
    while True:
        try:
            await backend.probe()
        except Exception as exc:  # never let the watcher die: what it could not probe is not serving
            log.warning("health check failed", extra={"fields": {"error": str(exc)}})
        states = {name: backend.serves(ensemble) for name, ensemble in settings.models.items()}
        required = settings.required_models
        overall = all(states[name] for name in required) if required else any(states.values())
        if readiness is not None:
            readiness.serving = overall
        for name, ready in states.items():
            await servicer.set(f"{SERVICE_NAME}/{name}", serving if ready else not_serving)
        for service in ("", SERVICE_NAME):
            await servicer.set(service, serving if overall else not_serving)
        if (overall, states) != last:
            log.info("health", extra={"fields": {"serving": overall, "models": states}})
            last = (overall, states)
        await asyncio.sleep(settings.health_poll_s)


async def start(settings: Settings) -> Gateway:
    # A bad key file stops the start here, before anything listens.
    keys = KeyRing(env_entries(settings.api_keys, settings.admin_api_keys), settings.api_keys_file)
    triton_credentials = (channel_credentials(settings.triton_tls_ca_file, settings.triton_tls_cert_file,
                                              settings.triton_tls_key_file) if settings.triton_tls_ca_file else None)
    tls = (CertificateFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
           if settings.tls_cert_file else None)
    backend = TritonPool(settings.triton_url, lambda address: TritonBackend(
        address, keepalive_s=settings.triton_keepalive_s, large_request_bytes=settings.triton_large_request_bytes,
        max_stream_backlog=settings.max_stream_backlog, connect_timeout_s=settings.triton_connect_timeout_s,
        credentials=triton_credentials),
        resolve_s=settings.triton_resolve_s,
        router=AffinityRouter(settings.routing, settings.affinity_load_factor, settings.affinity_keys),
        migration=MigrationPolicy(settings.max_migrations, settings.migration_reserve_s))
    await backend.probe()  # know the servers' states before the first request
    metrics = Metrics()
    metrics.registry.register(PoolCollector(backend))
    metrics.registry.register(backend.migration_counts)
    # The protos are the public contract: health and (by default) reflection answer without a key,
    # so `grpcurl -plaintext HOST list` works on first contact; every other RPC needs one.
    public = PUBLIC_METHODS | (REFLECTION_METHODS if settings.reflection == "public" else frozenset())
    server = grpc.aio.server(
        interceptors=[*tracing.server_interceptors(), AuthInterceptor(keys, ADMIN_METHODS, public)],
        # Checked against the inflated size too: a compressed bomb is refused before it is parsed.
        options=[("grpc.max_receive_message_length", settings.max_request_bytes),
                 ("grpc.max_concurrent_streams", settings.max_concurrent_streams)],
    )
    servicer = VisionLanguageServicer(settings, backend, metrics)
    vlm_pb2_grpc.add_VisionLanguageServiceServicer_to_server(servicer, server)
    vlm_pb2_grpc.add_ModelAdminServiceServicer_to_server(ModelAdminServicer(settings, backend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection != "off":
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server
        )
    port = (server.add_secure_port(settings.listen_address, tls.grpc_credentials()) if tls
            else server.add_insecure_port(settings.listen_address))
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen_address}")
    metrics_server, _ = start_http_server(settings.metrics_port, settings.metrics_address, registry=metrics.registry)
    await server.start()
    readiness = Readiness()
    watcher = asyncio.get_running_loop().create_task(watch_health(settings, backend, health_servicer, readiness))
    http = None
    if settings.http_address != "off":
        from gateway.http_api import create_app

        http = HttpServer(tracing.asgi(create_app(settings, servicer, keys, readiness)), settings.http_address, tls)
        await http.start()
    log.info("listening", extra={"fields": {"address": settings.listen_address, "port": port,
                                            "tls": ("mutual" if settings.tls_client_ca_file else "on") if tls else "off",
                                            "http": f"{settings.http_address} ({http.port if http else 'off'})",
                                            "triton": settings.triton_url,
                                            "metrics": f"{settings.metrics_address}:{metrics_server.server_port}"}})
    return Gateway(server, port, backend, health_servicer, metrics, metrics_server, watcher, servicer, readiness, http)


async def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    tracing.configure()  # before `start`: the servers get their tracing interceptor and middleware
    gateway = await start(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await gateway.drain(settings.drain_grace_s)
    log.info("stopped")
