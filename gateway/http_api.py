"""An OpenAI-compatible HTTP API in the gateway process (FastAPI on uvicorn, the gRPC server's loop).

`POST /v1/chat/completions` (unary and server-sent events), `GET /v1/models`, `GET /health`,
`/openapi.json`. Each request is translated into the public API's `GenerateRequest` and served by
the very servicer the gRPC API uses (`VisionLanguageServicer.handle`): one copy of validation,
limits, routing, the Triton connection and metrics. Errors come back in OpenAI's error shape with
HTTP codes mapped from the gRPC status. A client that disconnects cancels its generation, as a
cancelled gRPC stream does.

Beyond OpenAI's fields, answers carry `vlm` (confidence, model version, route, a task's result or
why there is none); requests may carry `vlm` too (task, routing), e.g. through the SDK's `extra_body`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field
from vlm.v1 import vlm_pb2

from gateway.auth import key_matches
from gateway.errors import ApiError
from gateway.servicer import VisionLanguageServicer
from gateway.settings import Settings

STATUS_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
FINISH_REASONS = {vlm_pb2.FINISH_REASON_STOP: "stop", vlm_pb2.FINISH_REASON_LENGTH: "length",
                  vlm_pb2.FINISH_REASON_CANCELLED: "stop"}
DETAILS = {"auto": vlm_pb2.IMAGE_DETAIL_AUTO, "low": vlm_pb2.IMAGE_DETAIL_LOW, "high": vlm_pb2.IMAGE_DETAIL_HIGH}
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,(.*)$", re.S)


# ----- the request body (OpenAI's chat completion fields this service serves) -----

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str = Field(description="a data:image/...;base64 URL, or an http(s) URL on the service's allowlist")
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Open):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class JSONSchemaFormat(_Open):
    name: str = "answer"
    schema_: dict = Field(alias="schema", default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class ResponseFormatBody(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(_Open):
    name: str
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDefinition(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Open):
    include_usage: bool = False


class ServiceOptions(_Open):
    """This service's own request options."""

    task: Literal["caption", "vqa", "ocr", "document", "grounding", "chart"] | None = None
    confidence_threshold: float | None = None
    disable_fallback: bool = False


class ChatCompletionRequest(_Open):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, description="tokens to generate (default 64)")
    max_completion_tokens: int | None = Field(None, description="as max_tokens (wins when both are given)")
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatBody | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    vlm: ServiceOptions | None = None


class HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.code = status, kind, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)

    @classmethod
    def of(cls, error: ApiError) -> "HttpError":
        status, kind = STATUS_TO_HTTP.get(error.code, (500, "server_error"))
        param = error.violations[0][0] if error.violations else None
        return cls(status, kind, error.message, param, error.code.name.lower())


def _bad(message: str, param: str) -> HttpError:
    return HttpError(400, "invalid_request_error", message, param, "invalid_argument")


# ----- translation -----

def _parts(content, where: str) -> tuple[list[vlm_pb2.Part], list[str]]:
    """The message's parts as the public API's, and the details its images asked for."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return [vlm_pb2.Part(text=content)], []
    parts, details = [], []
    for j, part in enumerate(content):
        if part.type == "text":
            parts.append(vlm_pb2.Part(text=part.text or ""))
            continue
        if part.image_url is None:
            raise _bad("an image_url part needs image_url.url", f"{where}.content[{j}].image_url")
        url = part.image_url.url
        data = _DATA_URL.match(url)
        if data:
            try:
                image = vlm_pb2.Image(data=base64.b64decode(data.group(1), validate=True))
            except (binascii.Error, ValueError):
                raise _bad("the data URL's base64 does not decode", f"{where}.content[{j}].image_url.url") from None
        elif url.startswith("data:"):
            raise _bad("a data URL must be data:image/<type>;base64,<data>", f"{where}.content[{j}].image_url.url")
        else:
            image = vlm_pb2.Image(url=url)
        parts.append(vlm_pb2.Part(image=image))
        if part.image_url.detail:
            details.append(part.image_url.detail)
    return parts, details


def to_generate_request(body: ChatCompletionRequest) -> vlm_pb2.GenerateRequest:
    """The chat completion as the public API's request (what gRPC callers send)."""
    if body.n != 1:
        raise _bad(f"n={body.n}: this service returns one choice per request; send n=1 (or leave it out)", "n")
    messages, details = [], []
    for i, message in enumerate(body.messages):
        if message.role == "tool":
            raise _bad("tool results in the conversation are not supported yet; send the tool's result as "
                       "a user message", f"messages[{i}].role")
        parts, asked = _parts(message.content, f"messages[{i}]")
        details += asked
        role = "system" if message.role == "developer" else message.role
        messages.append(vlm_pb2.Message(role=role, parts=parts))
    if len(set(details)) > 1:
        raise _bad(f"images ask for different details ({', '.join(sorted(set(details)))}); this service sizes "
                   "every image of a request alike: give one detail", "messages")
    config = vlm_pb2.GenerationConfig(max_tokens=body.max_completion_tokens or body.max_tokens or 0)
    for name in ("temperature", "top_p", "seed"):
        value = getattr(body, name)
        if value is not None:
            setattr(config, name, value)
    if body.stop is not None:
        config.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.response_format is not None and body.response_format.type != "text":
        Format = vlm_pb2.ResponseFormat
        if body.response_format.type == "json_object":
            config.response_format.CopyFrom(Format(type=Format.RESPONSE_FORMAT_JSON_OBJECT))
        else:
            schema = (body.response_format.json_schema or JSONSchemaFormat()).schema_
            config.response_format.CopyFrom(Format(type=Format.RESPONSE_FORMAT_JSON_SCHEMA, json_schema=json.dumps(schema)))
    request = vlm_pb2.GenerateRequest(model=body.model, messages=messages, config=config,
                                      detail=DETAILS[details[0]] if details else vlm_pb2.IMAGE_DETAIL_UNSPECIFIED)
    for tool in body.tools or ():
        request.tools.append(vlm_pb2.Tool(name=tool.function.name, description=tool.function.description,
                                          parameters=json.dumps(tool.function.parameters)))
    Mode = vlm_pb2.ToolChoice
    if isinstance(body.tool_choice, NamedToolChoice):
        request.tool_choice.CopyFrom(Mode(mode=Mode.TOOL_CHOICE_NAMED, name=body.tool_choice.function.name))
    elif body.tool_choice is not None:
        modes = {"none": Mode.TOOL_CHOICE_NONE, "auto": Mode.TOOL_CHOICE_AUTO, "required": Mode.TOOL_CHOICE_REQUIRED}
        request.tool_choice.CopyFrom(Mode(mode=modes[body.tool_choice]))
    if body.vlm is not None:
        if body.vlm.task:
            request.task = vlm_pb2.Task.Value(f"TASK_{body.vlm.task.upper()}")
        if body.vlm.confidence_threshold is not None or body.vlm.disable_fallback:
            request.routing.CopyFrom(vlm_pb2.RoutingOptions(disable_fallback=body.vlm.disable_fallback))
            if body.vlm.confidence_threshold is not None:
                request.routing.confidence_threshold = body.vlm.confidence_threshold
    return request


def _tool_calls(calls, request_id: str) -> list[dict]:
    return [{"id": f"call_{request_id[:24]}_{i}", "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for i, call in enumerate(calls)]


def _usage(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _extras(message) -> dict:
    """The service's own fields of a final answer (`vlm` in the response)."""
    extras = {"confidence": message.confidence, "model_version": message.model_version,
              "route": json_format.MessageToDict(message.route, preserving_proto_field_name=True)}
    result = message.WhichOneof("result")
    if result:
        extras["result"] = {result: json_format.MessageToDict(getattr(message, result), preserving_proto_field_name=True)}
    if message.result_error:
        extras["result_error"] = message.result_error
    return extras


def _finish_reason(message) -> str:
    return "tool_calls" if message.tool_calls else FINISH_REASONS.get(message.finish_reason, "stop")


def completion(answer: vlm_pb2.GenerateResponse, created: int) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": None if answer.tool_calls else answer.text}
    if answer.tool_calls:
        message["tool_calls"] = _tool_calls(answer.tool_calls, answer.request_id)
    return {"id": f"chatcmpl-{answer.request_id}", "object": "chat.completion", "created": created,
            "model": answer.model, "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(answer),
                                                "logprobs": None}],
            "usage": _usage(answer.usage), "vlm": _extras(answer)}


class _Deadline:
    """What the servicer asks of a call's context, for an HTTP request."""

    def __init__(self, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s

    def time_remaining(self) -> float:
        return self.deadline - time.monotonic()

    def set_trailing_metadata(self, pairs) -> None:
        pass


def create_app(settings: Settings, servicer: VisionLanguageServicer, ready=lambda: True) -> FastAPI:
    app = FastAPI(title="VLM serving: OpenAI-compatible API", version="1",
                  description="Chat completions with images over the same service as the vlm.v1 gRPC API.")

    @app.exception_handler(HttpError)
    async def http_error(request: Request, error: HttpError):
        return error.response()

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors())
        return _bad(f"invalid request: {problems}", param).response()

    def authenticate(request: Request) -> None:
        header = request.headers.get("authorization", "")
        presented = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
        if not key_matches(presented, settings.api_keys):
            raise HttpError(401, "authentication_error", "missing or unknown API key; send 'Authorization: Bearer <key>'",
                            code="invalid_api_key")

    async def body_of(request: Request) -> ChatCompletionRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise HttpError(413, "invalid_request_error", f"the request body of {declared} bytes is over the limit of "
                            f"{settings.max_request_bytes} bytes", code="request_too_large")
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > settings.max_request_bytes:
                raise HttpError(413, "invalid_request_error", f"the request body is over the limit of "
                                f"{settings.max_request_bytes} bytes", code="request_too_large")
        try:
            return ChatCompletionRequest.model_validate_json(bytes(raw))
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            errors = getattr(exc, "errors", lambda: [])()
            if errors:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
                raise _bad(f"invalid request: {problems}", ".".join(str(p) for p in errors[0]["loc"]) or None) from None
            raise _bad(f"the body is not JSON ({exc})", None) from None

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def chat_completions(request: Request):
        authenticate(request)
        body = await body_of(request)
        generate_request = to_generate_request(body)
        created = int(time.time())
        context = _Deadline(settings.default_timeout_s)
        if body.stream:
            return await _stream(request, body, generate_request, context, created)
        answer = vlm_pb2.GenerateResponse(model=body.model)
        work = asyncio.ensure_future(servicer.handle(generate_request, context, "Generate", False,
                                                     servicer.collector(generate_request, answer)))
        await _until_done_or_gone(request, work)
        error = work.result()
        if error is not None:
            raise HttpError.of(error)
        return JSONResponse(completion(answer, created))

    async def _stream(request: Request, body: ChatCompletionRequest, generate_request, context, created: int):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
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
        first = await queue.get()
        if isinstance(first, ApiError) or first is None:  # refused before any text: a plain HTTP error
            if first is not None:
                raise HttpError.of(first)

        async def events():
            item, sent_role = first, False
            try:
                while item is not None and not isinstance(item, ApiError):
                    chunk_id = f"chatcmpl-{item.request_id}"
                    delta: dict[str, Any] = {} if sent_role else {"role": "assistant"}
                    sent_role = True
                    final = item.finish_reason != vlm_pb2.FINISH_REASON_UNSPECIFIED
                    if item.text and not (final and item.tool_calls):
                        delta["content"] = item.text
                    if final and item.tool_calls:
                        delta["tool_calls"] = [dict(call, index=i) for i, call in
                                               enumerate(_tool_calls(item.tool_calls, item.request_id))]
                    event = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": item.model,
                             "choices": [{"index": 0, "delta": delta,
                                          "finish_reason": _finish_reason(item) if final else None}]}
                    if final:
                        event["vlm"] = _extras(item)
                    yield f"data: {json.dumps(event)}\n\n"
                    if final and include_usage:
                        usage = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                                 "model": item.model, "choices": [], "usage": _usage(item.usage)}
                        yield f"data: {json.dumps(usage)}\n\n"
                    item = await queue.get()
                if isinstance(item, ApiError):  # after text was sent: an error event, as OpenAI's stream has
                    yield f"data: {json.dumps({'error': _error_body(item)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                work.cancel()  # a client that went away cancels its generation (the row is freed)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models(request: Request):
        authenticate(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vlm-serving"}
                                           for name in sorted(settings.models)]}

    @app.get("/health")
    async def health():
        if ready():
            return {"status": "ok"}
        return JSONResponse({"status": "not ready"}, status_code=503)

    return app


def _error_body(error: ApiError) -> dict:
    http = HttpError.of(error)
    return {"message": http.message, "type": http.kind, "param": http.param, "code": http.code}


async def _until_done_or_gone(request: Request, work: asyncio.Future) -> None:
    """Wait for `work`; cancel it if the client disconnects first (its generation row is freed)."""
    while not work.done():
        await asyncio.wait({work}, timeout=0.25)
        if not work.done() and await request.is_disconnected():
            work.cancel()
            try:
                await work
            except asyncio.CancelledError:
                pass
            raise HttpError(499, "cancelled", "the client went away")
