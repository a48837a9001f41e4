"""Many Triton servers behind one gateway: each request to a healthy server that serves its model (the
one whose caches hold its images and prompt while it carries no more than its share, else the least
loaded: gateway/affinity.py), failover for requests that produced nothing yet, model control on every server.

Why not gRPC's own load balancing: small requests share one long-lived stream per server
(`triton_backend`), and a stream is pinned to one connection, so a channel-level policy such as
round_robin would send every request of the stream to one server. Balancing therefore happens per
request, here, over one `TritonBackend` (own channels, own shared stream) per server.

Servers come from `VLM_TRITON_URL`: one `host:port`, a comma-separated list, or `dns:///name:port`
for every address a name resolves to (a Kubernetes headless Service), re-resolved every
`triton_resolve_s`. The health watcher calls `probe()` every `health_poll_s`: each server's liveness
and repository index. A server whose request fails on the transport (connection lost, stream
broken, connect refused) is ejected at once and probed until it answers again (the last server for
a model is probed at once instead, and kept if it answers); one that says the model is not ready
there is passed over for that request. A request that had delivered nothing to its caller is then
retried on another server; a stream that had delivered text is continued on another server from the
tokens delivered (gateway/migration.py: bounded per request and by its deadline, else UNAVAILABLE), so
no caller ever sees text twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
from tritonclient.utils import InferenceServerException

from gateway.affinity import HASH_OFF_LOOP_BYTES, AffinityRouter, RequestKey, ServedKeys
from gateway import migration
from gateway.errors import ApiError
from gateway.migration import Answer, MigrationCounts, MigrationPolicy, incomplete
from gateway.triton_backend import TritonBackend, TritonError, classify, is_unloaded, pipeline_ready
from vlm_serving.ensemble_client import ResponseChunk

log = logging.getLogger("gateway")
DNS_PREFIX = "dns:///"
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as host:port targets (sorted, so the order is stable)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({f"[{info[4][0]}]:{port}" if info[0] == socket.AF_INET6 else f"{info[4][0]}:{port}"
                   for info in infos})


def parse_targets(url: str) -> tuple[list[str], tuple[str, int] | None]:
    """(static targets, or the (name, port) to resolve) from VLM_TRITON_URL."""
    if url.startswith(DNS_PREFIX):
        name, _, port = url[len(DNS_PREFIX):].rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"VLM_TRITON_URL={url!r}: write dns:///NAME:PORT")
        return [], (name, int(port))
    targets = [target.strip() for target in url.split(",") if target.strip()]
    if not targets:
        raise ValueError("VLM_TRITON_URL is empty: give host:port, a comma-separated list, or dns:///NAME:PORT")
    return targets, None


def server_failure(error: ApiError | InferenceServerException) -> str | None:
    """Why the server (not the request) failed, or None: "transport" (connection refused, lost or
    broken: eject the server) or "model" (the model is not ready there: ask another)."""
    if isinstance(error, ApiError):  # refused before sending: no connection to that server
        return "transport" if error.code == grpc.StatusCode.UNAVAILABLE else None
    return {TritonError.TRANSPORT: "transport", TritonError.MODEL_NOT_READY: "model"}.get(classify(error)[0])


def message_of(error: ApiError | InferenceServerException) -> str:
    return error.message if isinstance(error, ApiError) else (error.message() or str(error))


class NoServerReady(ApiError):
    """No server of the pool can take the request now (retryable); `states` says why, per server."""

    def __init__(self, ensemble: str, states: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE,
                         f"no inference server can take {ensemble!r} now ({states}); retry with backoff",
                         retry_after_s=1.0)
        self.states = states


@dataclass
class Server:
    """One Triton server of the pool and what the gateway knows of it."""

    address: str
    backend: TritonBackend
    healthy: bool = False
    index: list[dict] = field(default_factory=list)
    outstanding: int = 0
    last_error: str = ""
    # Left the DNS answer: takes no new requests, closed once its last one ends.
    retired: bool = False
    # A probe under way (after a failure), shared by every request that saw the failure.
    recheck: asyncio.Task | None = None
    # The keys of the requests last sent here: what its caches may still hold (gateway/affinity.py).
    served: ServedKeys = field(default_factory=ServedKeys)

    def serves(self, ensemble: str) -> bool:
        return self.healthy and not self.retired and pipeline_ready(self.index, ensemble)


class TritonPool:
    """The gateway's backend: the TritonBackend interface, over every server of the pool."""

    def __init__(self, url: str, backend_factory: Callable[[str], TritonBackend], resolve_s: float = 10.0,
                 resolver: Resolver = resolve_addresses, probe_timeout_s: float = 2.0,
                 router: AffinityRouter | None = None, migration: MigrationPolicy = MigrationPolicy()):
        self.url = url
        self.targets, self.dns_name = parse_targets(url)
        self.backend_factory = backend_factory
        self.resolver = resolver
        self.resolve_s = resolve_s
        self.probe_timeout_s = probe_timeout_s
        self.router = router or AffinityRouter()
        # Streams whose server fails after they began: continued elsewhere within this policy (gateway/migration.py).
        self.migration = migration
        self.migration_counts = MigrationCounts()
        self.servers: dict[str, Server] = {}
        self._next_resolve = 0.0
        self._turn = itertools.count()  # rotates ties, so idle servers take turns
        for target in self.targets:
            self._add(target)

    # --- membership and health -------------------------------------------------------------------

    def _add(self, address: str) -> None:
        self.servers[address] = Server(address, self.backend_factory(address), served=self.router.served_keys())
        log.info("backend added", extra={"fields": {"backend": address}})

    async def _resolve(self) -> None:
        if self.dns_name is None or time.monotonic() < self._next_resolve:
            return
        self._next_resolve = time.monotonic() + self.resolve_s
        try:
            addresses = set(await self.resolver(*self.dns_name))
        except OSError as exc:  # keep the servers we know: a DNS hiccup is not an outage
            log.warning("cannot resolve the Triton servers", extra={"fields": {"name": self.dns_name[0], "error": str(exc)}})
            return
        for address in addresses - set(self.servers):
            self._add(address)
        for address, server in self.servers.items():
            if address not in addresses and not server.retired:
                server.retired = True
                log.info("backend left the DNS answer", extra={"fields": {"backend": address}})

    async def _probe_one(self, server: Server) -> None:
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                live = await server.backend.server_live()
                index = await server.backend.repository_index() if live else []
        except (InferenceServerException, TimeoutError, grpc.RpcError) as exc:
            live, index = False, []
            server.last_error = getattr(exc, "message", lambda: "")() or type(exc).__name__
        if live and not server.healthy:
            log.info("backend healthy", extra={"fields": {"backend": server.address}})
            server.last_error = ""
        elif not live and server.healthy:
            self.eject(server, server.last_error or "not live")
        server.healthy, server.index = live, index

    async def probe(self) -> None:
        """Resolve (when due), probe every server once, close retired servers that are idle."""
        await self._resolve()
        await asyncio.gather(*(self._probe_one(server) for server in self.servers.values()))
        for address, server in list(self.servers.items()):
            if server.retired and server.outstanding == 0:
                del self.servers[address]
                await server.backend.close()
                log.info("backend removed", extra={"fields": {"backend": address}})

    def eject(self, server: Server, reason: str) -> None:
        if server.healthy:
            log.warning("backend ejected", extra={"fields": {"backend": server.address, "reason": reason}})
        server.healthy, server.last_error = False, reason
        server.served.clear()  # it may come back restarted, its caches empty: no request is steered there for them

    async def _on_transport_failure(self, server: Server, ensemble: str, reason: str) -> None:
        """Eject a server whose connection failed, while others serve the model; the last one is
        probed at once instead and stays if it answers (a stream that broke once must not take the
        model out of service until the next scheduled probe)."""
        if any(other.serves(ensemble) for other in self.servers.values() if other is not server):
            self.eject(server, reason)
            return
        if server.recheck is None or server.recheck.done():
            server.recheck = asyncio.get_running_loop().create_task(self._probe_one(server))
        await asyncio.shield(server.recheck)
        if server.healthy:
            log.info("the only server for a model failed a request and answers its probe: kept", extra={
                "fields": {"backend": server.address, "model": ensemble, "reason": reason}})

    def serves(self, ensemble: str) -> bool:
        """Whether some server can take the model's requests now."""
        return any(server.serves(ensemble) for server in self.servers.values())

    def _choose(self, ensemble: str, tried: set[str], key: RequestKey | None = None) -> Server | None:
        """The server for a request (`key`: what of it servers may have cached): by cache affinity
        within the load bound, else the least loaded (`AffinityRouter`). With one server in the pool
        there is nothing to choose, and nothing is hashed."""
        candidates = [s for s in self.servers.values() if s.serves(ensemble) and s.address not in tried]
        if not candidates:
            return None
        turn = next(self._turn) % len(candidates)
        return self.router.choose(candidates[turn:] + candidates[:turn], key if len(self.servers) > 1 else None)

    # --- requests ---------------------------------------------------------------------------------

    async def generate(self, ensemble: str, *args, affinity: RequestKey | None = None,
                       **kwargs) -> AsyncIterator[ResponseChunk]:
        """TritonBackend.generate on the server `_choose` picks among those that serve `ensemble`;
        on a server failure before anything was delivered, again on the next one; after, continued
        on the next one from what was delivered (gateway/migration.py), within `self.migration`."""
        tried: set[str] = set()
        answer = Answer(ensemble, args, kwargs)
        if (affinity is not None and len(self.servers) > 1 and self.router.mode == "affinity"
                and affinity.media_bytes > HASH_OFF_LOOP_BYTES):
            await asyncio.to_thread(affinity.compute)
        failed: tuple[str, str] | None = None  # (server, error) that ended the answer's last attempt
        while True:
            server = self._choose(answer.target, tried, affinity)
            if server is None:
                if not answer.delivered:
                    raise self._none_ready(ensemble, tried)
                self.migration_counts.count(ensemble, migration.NO_SERVER)
                raise incomplete(*failed, f"no other server can take it ({self._none_ready(answer.target, tried).states})")
            if answer.delivered:
                answer.migrations += 1
                self.migration_counts.count(ensemble, migration.MIGRATED)
                log.warning("stream migrated to another backend", extra={"fields": {
                    "backend": server.address, "failed_backend": failed[0], "model": ensemble,
                    "delivered_tokens": len(answer.token_ids), "migration": answer.migrations}})
            tried.add(server.address)
            server.outstanding += 1
            try:
                # Closed with this generator: a caller who gives up cancels the request on its server now.
                args, kwargs = answer.continuation() if answer.delivered else answer.call
                async with aclosing(server.backend.generate(*args, **kwargs)) as chunks:
                    async for chunk in chunks:
                        yield answer.received(chunk)
                return
            except (InferenceServerException, ApiError) as error:
                failure = server_failure(error)
                if failure is None:
                    raise
                if failure == "transport":
                    await self._on_transport_failure(server, ensemble, message_of(error))
                failed = (server.address, message_of(error))
                if not answer.delivered:
                    log.info("retrying on another backend", extra={"fields": {"backend": server.address, "why": failure}})
                    continue
                refused = answer.refusal(self.migration)
                if refused is not None:
                    self.migration_counts.count(ensemble, refused[0])
                    log.warning("stream not migrated", extra={"fields": {
                        "backend": server.address, "model": ensemble, "delivered_tokens": len(answer.token_ids),
                        "error": failed[1], "why": refused[1]}})
                    raise incomplete(*failed, refused[1]) from None
            finally:
                server.outstanding -= 1

    def _none_ready(self, ensemble: str, tried: set[str]) -> NoServerReady:
        states = "; ".join(f"{s.address}: " + ("retired" if s.retired else "failed this request" if s.address in tried
                                                else f"not serving it ({s.last_error})" if not s.healthy
                                                else "model not ready")
                           for s in self.servers.values()) or f"no server found at {self.url}"
        return NoServerReady(ensemble, states)

    # --- the model repository, across servers ----------------------------------------------------

    def _live(self) -> list[Server]:
        return [s for s in self.servers.values() if s.healthy and not s.retired]

    async def server_live(self) -> bool:
        return bool(self._live())

    async def repository_index(self) -> list[dict]:
        """One index for the pool, fresh from every healthy server: a version is READY only where it is
        READY on every server that has it; otherwise it takes a lagging server's state, and its reason
        names the servers that lag."""
        await asyncio.gather(*(self._probe_one(server) for server in self._live()))
        merged: dict[tuple[str, str], dict] = {}
        per_version: dict[tuple[str, str], list[tuple[str, dict]]] = {}
        for server in self._live():
            for entry in server.index:
                if not is_unloaded(entry):
                    per_version.setdefault((entry.get("name"), entry.get("version", "")), []).append((server.address, entry))
        for key, entries in per_version.items():
            lagging = [(address, entry) for address, entry in entries if entry.get("state") != "READY"]
            if not lagging:
                merged[key] = dict(entries[0][1])
                continue
            entry = dict(lagging[0][1])
            ready_on = [address for address, e in entries if e.get("state") == "READY"]
            entry["reason"] = "; ".join(
                [f"{e.get('state')} on {address}" + (f" ({e['reason']})" if e.get("reason") else "")
                 for address, e in lagging] + ([f"READY on {', '.join(ready_on)}"] if ready_on else []))
            merged[key] = entry
        return list(merged.values())

    async def model_parameters(self, name: str) -> dict[str, str]:
        """The model's config parameters, from a live server where it is READY (else any live one)."""
        live = self._live()
        if not live:
            raise InferenceServerException("no inference server is live", status=str(grpc.StatusCode.UNAVAILABLE))
        ready = [s for s in live if any(e.get("name") == name and e.get("state") == "READY" for e in s.index)]
        return await (ready or live)[0].backend.model_parameters(name)

    async def on_every_server(self, operation: str, name: str) -> dict[str, str]:
        """`operation` ("load_model" or "unload_model") of `name` on every live server at once:
        {address: "" when it succeeded, else Triton's message}."""
        live = self._live()
        if not live:
            raise InferenceServerException("no inference server is live", status=str(grpc.StatusCode.UNAVAILABLE))

        async def run(server: Server) -> str:
            try:
                await getattr(server.backend, operation)(name)
                return ""
            except InferenceServerException as exc:
                return exc.message() or str(exc)

        results = await asyncio.gather(*(run(server) for server in live))
        return {server.address: result for server, result in zip(live, results)}

    def states(self) -> list[Server]:
        return sorted(self.servers.values(), key=lambda s: s.address)

    async def close(self) -> None:
        await asyncio.gather(*(server.backend.close() for server in self.servers.values()))
