"""API-key authentication for every RPC except health checks (and reflection, when public).

The key is checked from the call's metadata before any of its request is read: a refused call
costs no message buffer, whatever it sends. Keys, their names and scopes: gateway/keys.py.
"""

from __future__ import annotations

import logging

import grpc

from gateway.keys import KeyRing, caller_var

audit_log = logging.getLogger("gateway.audit")
PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def bearer_key(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Who calls (gateway/keys.py): the key's entry is put in `caller_var` for the request's quotas,
    logs and metrics; admin methods need an admin-scoped key."""

    def __init__(self, keys: KeyRing, admin_methods: frozenset[str] = frozenset(),
                 public_methods: frozenset[str] = PUBLIC_METHODS):
        self.keys = keys
        self.public_methods = public_methods
        self.admin_methods = admin_methods

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method in self.public_methods or handler is None:
            return handler
        # The handler runs in this task: what is set here is the request's.
        entry = await self.keys.identify(bearer_key(details.invocation_metadata))
        if entry is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or unknown API key; send metadata 'authorization: Bearer <key>'")
        caller_var.set(entry)
        if details.method in self.admin_methods and not entry.admin:
            # Audited as the admin calls that ran are (gateway/admin.py), before the request is read.
            audit_log.info("admin call", extra={"fields": {"key": entry.name, "rpc": details.method.rsplit("/", 1)[-1],
                                                           "model": "", "result": "PERMISSION_DENIED"}})
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"{details.method} needs an admin-scoped API key (key {entry.name!r} is {entry.scope})")
        return handler


def _refusal(handler, code: grpc.StatusCode, message: str):
    """A handler that answers `code` without reading the request: stream-shaped whatever the
    method's shape, so no message is ever received, inflated or parsed for a caller without a key
    (a unary handler gets the request already deserialized)."""
    async def refuse(requests, context):
        await context.abort(code, message)

    if handler.unary_unary or handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)

    async def refuse_stream(requests, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=handler.response_serializer)
