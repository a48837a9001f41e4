"""API-key authentication for every RPC except health checks (and reflection, when public).

The key is checked from the call's metadata before any of its request is read: a refused call
costs no message buffer, whatever it sends.
"""

from __future__ import annotations

import hmac

import grpc

PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def bearer_key(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def key_matches(presented: str | None, keys: frozenset[str]) -> bool:
    """Whether `presented` is one of `keys`. Compared as bytes (any text, even non-ASCII, is just a
    wrong key) against every key with no early exit, so timing tells nothing about the keys."""
    if presented is None:
        return False
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode("utf-8"))
    return matched


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_keys: frozenset[str], admin_methods: frozenset[str] = frozenset(),
                 admin_keys: frozenset[str] = frozenset(), public_methods: frozenset[str] = PUBLIC_METHODS):
        self.api_keys = api_keys
        self.public_methods = public_methods
        self.admin_methods = admin_methods
        self.admin_keys = admin_keys

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method in self.public_methods or handler is None:
            return handler
        presented = bearer_key(details.invocation_metadata)
        if not key_matches(presented, self.api_keys):
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or unknown API key; send metadata 'authorization: Bearer <key>'")
        if details.method in self.admin_methods and not key_matches(presented, self.admin_keys):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"{details.method} needs an admin-scoped API key")
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
