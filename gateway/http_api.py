"""An OpenAI-compatible HTTP API in the gateway process (FastAPI on uvicorn, the gRPC server's loop).

`POST /v1/chat/completions` (unary and server-sent events), `GET /v1/models`, `GET /v1/models/{id}`,
`GET /health`, `/openapi.json`. Each request is translated into the public API's `GenerateRequest`
(gateway/openai_protocol.py) and served by the very servicer the gRPC API uses
(`VisionLanguageServicer.handle`): one copy of validation, limits, routing, the Triton connection
and metrics. Errors come back in OpenAI's error shape with HTTP codes mapped from the gRPC status
and the headers that tell the openai SDK what it may retry. A client that disconnects cancels its
generation, as a cancelled gRPC stream does, before its first token too.

The key is checked before the body is read; the body is bounded (4/3 of the gRPC message limit,
for base64), its counts are checked before it is validated, and a large one is parsed off the event
loop. Every response carries `x-request-id` (the caller's, when it sends a valid one).

Beyond OpenAI's fields, answers carry `vlm` (confidence, model version, route, a task's result or
why there is none); requests may carry `vlm` too (task, routing), e.g. through the SDK's `extra_body`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from vlm.v1 import vlm_pb2

from gateway import media_budget, openai_protocol as protocol, tracing
from gateway.errors import ApiError
from gateway.keys import KeyRing, caller_var
from gateway.observability import request_id_var
from gateway.openai_protocol import ChatCompletionRequest, HttpError, ParamNames, bad_request
from gateway.openapi import describe
from gateway.servicer import VisionLanguageServicer
from gateway.settings import REQUEST_TEXT_ALLOWANCE, Settings
from gateway.validation import REQUEST_ID

# Bodies larger than this are parsed on a worker thread: the event loop serves everyone else meanwhile.
OFF_LOOP_BYTES = 64 * 1024
# What a body may hold besides its images' and videos' base64: the gRPC message's allowance for text, tools and
# schemas, twice over for JSON's escapes and layout. Checked before parsing: a JSON parser holds
# the interpreter for the whole document, so a body of millions of small objects is refused unread.
MAX_BODY_BYTES_BESIDE_IMAGES = 2 * REQUEST_TEXT_ALLOWANCE
_BASE64_START = b";base64,"


class RequestIds:
    """ASGI middleware: every request gets an id (the caller's `x-request-id` when valid, else a new
    one), kept in `scope["state"]` and sent back in the response's `x-request-id` header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        request_id_var.set(request_id)  # on log lines and spans from here on
        tracing.tag_request(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class _Deadline:
    """What the servicer asks of a call's context, for an HTTP request."""

    def __init__(self, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s

    def time_remaining(self) -> float:
        return self.deadline - time.monotonic()

    def set_trailing_metadata(self, pairs) -> None:
        pass


def error_response(error: HttpError) -> JSONResponse:
    return JSONResponse({"error": error.body()}, status_code=error.status, headers=error.headers())


def bytes_beside_images(raw: bytes, max_images: int) -> int:
    """The body's bytes outside its data URLs' base64 payloads (the first `max_images` of them, images
    and videos alike; string searches only, no parsing)."""
    images, start = 0, raw.find(_BASE64_START)
    for _ in range(max_images):
        if start < 0:
            break
        start += len(_BASE64_START)
        end = raw.find(b'"', start)
        if end < 0:
            break
        images += end - start
        start = raw.find(_BASE64_START, end)
    return len(raw) - images


def parse_body(raw: bytes, settings: Settings) -> ChatCompletionRequest:
    """The body as a request: JSON first, then its counts (cheap, before pydantic walks a flood
    of parts), then the schema."""
    try:
        data = pydantic_core.from_json(raw)  # jiter: the fastest JSON parser at hand
    except ValueError as exc:
        raise bad_request(f"the body is not JSON ({exc})", None) from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list):
        if len(messages) > settings.max_messages:
            raise bad_request(f"{len(messages)} messages is over the limit of {settings.max_messages}", "messages")
        counts = [len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), list) else 1
                  for m in messages]
        for i, count in enumerate(counts):
            if count > settings.max_parts_per_message:
                raise bad_request(f"{count} parts is over the limit of {settings.max_parts_per_message} per message",
                                  f"messages[{i}].content")
        if sum(counts) > settings.max_parts:
            raise bad_request(f"{sum(counts)} parts is over the limit of {settings.max_parts} per request", "messages")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise protocol.validation_problems(exc.errors()) from None


def create_app(settings: Settings, servicer: VisionLanguageServicer, keys: KeyRing, ready=lambda: True) -> FastAPI:
    # No /docs or /redoc: FastAPI's pages load their scripts from a public CDN. /openapi.json
    # describes the API for any viewer or client generator.
    app = FastAPI(title="VLM serving: OpenAI-compatible API", version="1", docs_url=None, redoc_url=None,
                  description="Chat completions with images over the same service as the vlm.v1 gRPC API.")
    app.add_middleware(RequestIds)

    @app.exception_handler(HttpError)
    async def http_error(request: Request, error: HttpError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return error_response(protocol.validation_problems(
            [dict(e, loc=tuple(e["loc"][1:])) for e in error.errors()]))

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, error: StarletteHTTPException):  # no such route or method
        return error_response(HttpError(error.status_code, "invalid_request_error" if error.status_code < 500 else
                                        "server_error", f"{request.method} {request.url.path}: {error.detail}"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        request_id = request.scope.get("state", {}).get("request_id")
        return error_response(HttpError(500, "server_error", f"internal error in the gateway (request id {request_id}); "
                                        "the gateway logged the details under this id", code="internal"))

    async def authenticate(request: Request) -> None:
        """The caller's key entry into `caller_var` (the request's quotas, logs and metrics), or 401."""
        header = request.headers.get("authorization", "")
        presented = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
        entry = await keys.identify(presented)
        if entry is None:
            raise HttpError(401, "authentication_error", "missing or unknown API key; send 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        caller_var.set(entry)

    def hold_body(size: int) -> None:
        """The body's bytes (its images' and videos' base64) in the gateway's in-flight media budget."""
        try:
            media_budget.cover(size)
        except ApiError as error:
            raise HttpError(429, "rate_limit_error", error.message, code=error.code.name.lower(),
                            retry_after_s=error.retry_after_s) from None

    async def body_of(request: Request) -> ChatCompletionRequest:
        limit = settings.max_http_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, "invalid_request_error", f"the request body of {declared} bytes is over the limit of "
                            f"{limit} bytes", code="request_too_large")
        if declared and declared.isdigit():
            hold_body(int(declared))  # before the body is read
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > limit:
                raise HttpError(413, "invalid_request_error", f"the request body is over the limit of {limit} bytes",
                                code="request_too_large")
        hold_body(len(raw))  # a body without Content-Length, once read
        beside = bytes_beside_images(raw, settings.max_images + settings.max_videos)
        if beside > MAX_BODY_BYTES_BESIDE_IMAGES:
            raise HttpError(413, "invalid_request_error", f"the request body holds {beside} bytes besides its images' "
                            f"and videos' data, over the limit of {MAX_BODY_BYTES_BESIDE_IMAGES} bytes",
                            code="request_too_large")
        if len(raw) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse_body, bytes(raw), settings)
        return parse_body(bytes(raw), settings)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # The body's bytes stay reserved until the request ends (a stream's: until its servicer call ends).
        with servicer.media.hold():
            return await _chat_completions(request)

    async def _chat_completions(request: Request):
        await authenticate(request)
        body = await body_of(request)
        generate_request = protocol.to_generate_request(body, request.scope["state"]["request_id"])
        names = ParamNames(body)
        created = int(time.time())
        context = _Deadline(settings.default_timeout_s)
        if body.stream:
            return await _stream(request, body, generate_request, names, context, created)
        answer = vlm_pb2.GenerateResponse(model=body.model)
        work = asyncio.ensure_future(servicer.handle(generate_request, context, "Generate", False,
                                                     servicer.collector(generate_request, answer)))
        await _until_done_or_gone(request, work, work)
        error = work.result()
        if error is not None:
            raise HttpError.of(error, names)
        return JSONResponse(protocol.completion(answer, created, bool(body.logprobs)))

    async def _stream(request: Request, body: ChatCompletionRequest, generate_request, names: ParamNames, context,
                      created: int):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        calls = protocol.CallMarkupFilter(bool(body.tools) and body.tool_choice != "none")
        # Bounded as on gRPC: a reader that falls this far behind holds up its own generation,
        # which then fails with RESOURCE_EXHAUSTED (the backend's backlog) or its deadline.
        queue: asyncio.Queue = asyncio.Queue(maxsize=settings.max_stream_backlog)

        async def deliver(chunk, call, outcome):
            await queue.put(servicer.stream_message(generate_request, chunk, call, outcome))

        async def run():
            try:
                await queue.put(await servicer.handle(generate_request, context, "GenerateStream", True, deliver))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never leave the response waiting
                await queue.put(ApiError(grpc.StatusCode.INTERNAL, f"internal error ({exc})"))

        work = asyncio.ensure_future(run())
        first_item = asyncio.ensure_future(queue.get())
        await _until_done_or_gone(request, first_item, work)  # a client gone before the first token frees its row
        first = first_item.result()
        if isinstance(first, ApiError):  # refused before any text: a plain HTTP error
            raise HttpError.of(first, names)

        def event(item, choices: list[dict], **more) -> str:
            return "data: " + json.dumps({"id": f"chatcmpl-{item.request_id}", "object": "chat.completion.chunk",
                                          "created": created, "model": item.model, "choices": choices, **more}) + "\n\n"

        async def events():
            item, role = first, {"role": "assistant"}
            try:
                while item is not None and not isinstance(item, ApiError):
                    final = item.finish_reason != vlm_pb2.FINISH_REASON_UNSPECIFIED
                    text = calls.feed(item.text) + (calls.finish(bool(item.tool_calls)) if final else "")
                    delta: dict[str, Any] = dict(role, **({"content": text} if text else {}))
                    if final and item.tool_calls:
                        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(protocol.tool_calls(item.tool_calls))]
                    if delta or final or item.logprobs:
                        role = {}
                        choice = {"index": 0, "delta": delta, "finish_reason": protocol.finish_reason(item) if final else None}
                        if body.logprobs:
                            choice["logprobs"] = protocol.logprobs(item.logprobs)
                        # The service's own fields ride on the last chunk.
                        yield event(item, [choice], **({"vlm": protocol.extras(item)} if final else {}))
                    if final and include_usage:
                        yield event(item, [], usage=protocol.usage(item.usage))
                    item = await queue.get()
                if isinstance(item, ApiError):  # after text was sent: an error event, as OpenAI's stream has
                    yield f"data: {json.dumps({'error': HttpError.of(item, names).body()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                work.cancel()  # a client that went away cancels its generation (the row is freed)

        return StreamingResponse(events(), media_type="text/event-stream")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "vlm-serving"}

    @app.get("/v1/models")
    async def models(request: Request):
        await authenticate(request)
        return {"object": "list", "data": [model_card(name) for name in sorted(settings.models)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        await authenticate(request)
        if model_id not in settings.models:
            raise HttpError(404, "not_found_error", f"model {model_id!r} is not served here; available: "
                            f"{', '.join(sorted(settings.models))}", "model", "model_not_found")
        return model_card(model_id)

    @app.get("/health")
    async def health():
        if ready():
            return {"status": "ok"}
        return JSONResponse({"status": "not ready"}, status_code=503)

    app.openapi = lambda: describe(app, settings)
    return app


async def _until_done_or_gone(request: Request, awaited: asyncio.Future, work: asyncio.Future) -> None:
    """Wait for `awaited`; if the client disconnects first, cancel `work` (its generation row is
    freed) and answer 499."""
    while not awaited.done():
        await asyncio.wait({awaited}, timeout=0.25)
        if not awaited.done() and await request.is_disconnected():
            for future in {awaited, work}:
                future.cancel()
            try:
                await work
            except asyncio.CancelledError:
                pass
            raise HttpError(499, "cancelled", "the client went away")
