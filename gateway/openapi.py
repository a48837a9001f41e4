"""The HTTP API's OpenAPI description: every schema resolvable, every response a route can give
documented (status, body, headers), the bearer key declared where it is needed.

FastAPI describes only what it parses itself; the chat completion route reads its body on its own
(the key is checked before the body is read), so its request body, its responses and theirs are
described here, from the same pydantic models the routes use.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from gateway.openai_protocol import ChatCompletionRequest
from gateway.settings import Settings
from gateway.validation import MAX_VIDEO_FPS, VIDEO_FRAMES
from vlm_serving.generation.sampling import BOUNDS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int
    message: AnswerMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: dict[str, Any] | None


class PromptTokensDetails(BaseModel):
    # Prompt tokens the engine's prefix cache held (not prefilled again).
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    vlm: dict[str, Any]


class ToolCallDelta(ToolCallOut):
    index: int


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed answer; the last chunk carries `vlm`, and a chunk with no choices the
    usage (stream_options.include_usage)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    vlm: dict[str, Any] | None = None


# A streamed answer's events. OpenAPI 3.1 has a text/event-stream schema describe one event as a
# client parses it (data, event, id, retry: what Schemathesis checks, as 3.2's itemSchema would).
# Its data is a chunk, an error after text was sent (as OpenAI's stream has), or the closing [DONE].
SERVER_SENT_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
                {"$ref": REF.format(model="ChatCompletionChunk")}, {"$ref": REF.format(model="ErrorBody")}]}},
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class HealthBody(BaseModel):
    status: Literal["ok", "not ready"]


ERRORS = {
    400: "the request is invalid: `error.param` names the field",
    401: "missing or unknown API key",
    404: "the model is not served here",
    413: "the body is over the size limit",
    429: "the model is at capacity, or the key is over a quota or its fair share; retry after `retry-after-ms`",
    499: "the client went away before the answer",
    500: "the service failed (`x-should-retry` says whether a retry may repeat work)",
    503: "no inference server can take the model now; retry with backoff",
    504: "no complete answer within the deadline",
}
REQUEST_ID = {"x-request-id": {"description": "the request's id (the caller's when it sent a valid one)",
                               "schema": {"type": "string"}}}
RETRY = {"x-should-retry": {"description": "whether the request may be retried as it is",
                            "schema": {"type": "string", "enum": ["true", "false"]}},
         "retry-after-ms": {"description": "when a retry may come (milliseconds)", "schema": {"type": "string"}},
         "retry-after": {"description": "when a retry may come (seconds)", "schema": {"type": "string"}}}
STATUSES = {
    ("/v1/chat/completions", "post"): (400, 401, 404, 413, 429, 499, 500, 503, 504),
    ("/v1/models", "get"): (401, 500),
    ("/v1/models/{model_id}", "get"): (401, 404, 500),
    ("/health", "get"): (),
}


def _schemas(*models: type[BaseModel]) -> dict[str, dict]:
    """Each model's JSON schema under its name, with every model it refers to beside it."""
    found = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def _json(model: type[BaseModel]) -> dict:
    return {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}


def _bounds(schemas: dict, settings: Settings) -> None:
    """The limits the service enforces, written into the request's schema (from the same numbers
    the checks use), so a client or a fuzzer knows them."""
    request = schemas["ChatCompletionRequest"]["properties"]
    request["model"].update(enum=sorted(settings.models),
                            description="a served model (GET /v1/models); another name is answered 404")
    for name, bound in BOUNDS.items():  # an open low end is on the wire too: it means the default
        request[name].update(minimum=bound.low, maximum=bound.high)
    for name in ("max_tokens", "max_completion_tokens"):
        request[name].update(maximum=settings.max_tokens_limit)
    request["n"].update(minimum=1, maximum=1)
    request["messages"].update(minItems=1, maxItems=settings.max_messages)
    request["stop"].update(maxItems=MAX_STOP_SEQUENCES, minLength=1, maxLength=MAX_STOP_CHARS)
    schemas["ChatMessage"]["properties"]["content"].update(maxItems=settings.max_parts_per_message, minLength=1)
    video = schemas["VideoURL"]["properties"]
    video["fps"].update(exclusiveMinimum=0, maximum=MAX_VIDEO_FPS)
    video["max_frames"].update(minimum=VIDEO_FRAMES.start, maximum=VIDEO_FRAMES.stop - 1)


def describe(app: FastAPI, settings: Settings) -> dict:
    """The description of `app`, serving under `settings`."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = document.setdefault("components", {})
    components["schemas"] = _schemas(ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, ErrorBody, ModelList,
                                     ModelCard, HealthBody)
    _bounds(components["schemas"], settings)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "an API key of the service"}}
    successes = {
        ("/v1/chat/completions", "post"): {"description": "the answer: JSON, or server-sent events when stream is true",
                                           "content": {**_json(ChatCompletion),
                                                       "text/event-stream": {"schema": SERVER_SENT_EVENT}}},
        ("/v1/models", "get"): {"description": "the served models", "content": _json(ModelList)},
        ("/v1/models/{model_id}", "get"): {"description": "the model", "content": _json(ModelCard)},
        ("/health", "get"): {"description": "this replica can serve", "content": _json(HealthBody)},
    }
    for (path, method), statuses in STATUSES.items():
        operation = document["paths"][path][method]
        responses = {"200": dict(successes[(path, method)], headers=REQUEST_ID)}
        for status in statuses:
            responses[str(status)] = {"description": ERRORS[status], "content": _json(ErrorBody),
                                      "headers": {**REQUEST_ID, **RETRY}}
        if path == "/health":
            responses["503"] = {"description": "this replica cannot serve now (no model ready, or draining)",
                                "content": _json(HealthBody), "headers": REQUEST_ID}
        else:
            operation["security"] = [{"bearer": []}]
        operation["responses"] = responses
        if path == "/v1/chat/completions":
            operation["requestBody"] = {"required": True, "content": _json(ChatCompletionRequest)}
    app.openapi_schema = document
    return document
