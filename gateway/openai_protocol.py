"""OpenAI's chat completion protocol: the request body, its translation into the public API's
`GenerateRequest`, and the answers and errors in OpenAI's shapes.

Kept apart from the HTTP routes (gateway/http_api.py), as vLLM keeps its protocol apart from its
server. Every field a client may send is either honoured or refused with 400 naming it: the top
level forbids unknown fields, and OpenAI fields this service does not serve get their own message.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, Literal

import grpc
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field
from vlm.v1 import vlm_pb2

from gateway.errors import ApiError

INT32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
POSITIVE_INT32 = Annotated[int, Field(ge=1, le=2**31 - 1)]
INT64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
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
# A video's data URL: video/<type>, or image/gif (an animated GIF is a clip too).
_VIDEO_DATA_URL = re.compile(r"^data:(?:video/[A-Za-z0-9.+-]+|image/gif);base64,(.*)$", re.S)
# OpenAI request fields this service does not serve: refused with this reason, not silently ignored.
UNSERVED = {
    "logit_bias": "token-level logit biases are not supported",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "store": "completions are not stored",
    "metadata": "completions are not stored", "service_tier": "there is one service tier",
    "reasoning_effort": "the models here do not reason in a separate channel",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated functions field is not supported; send tools",
    "function_call": "the deprecated function_call field is not supported; send tool_choice",
}


# ----- the request body ------------------------------------------------------------------------

class _Lenient(BaseModel):
    """Nested objects: fields this service has no use for are ignored (clients add their own)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImageURL(_Lenient):
    url: str = Field(description="a data:image/...;base64 URL, or an http(s) URL on the service's allowlist")
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(_Lenient):
    """vLLM's video part, with this service's sampling options (unset: their defaults)."""

    url: str = Field(description="a data:video/...;base64 URL (MP4 H.264, WebM VP8/VP9; data:image/gif for an "
                                 "animated GIF), or an http(s) URL on the service's allowlist")
    fps: float | None = Field(None, description="this service's extension: frames to sample per second "
                                                "(default 2, at most 30)")
    max_frames: INT32 | None = Field(None, description="this service's extension: the most frames to sample "
                                                       "(default 32, 2 to 256)")


class ContentPart(_Lenient):
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str = Field(description="the call's arguments, a JSON object as text")


class ToolCallBody(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    # assistant: the calls it made; tool: the call its content answers.
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None


class JSONSchemaFormat(_Lenient):
    name: str = "answer"
    schema_: dict = Field(alias="schema", default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class ResponseFormatBody(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(_Lenient):
    name: str
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDefinition(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class ServiceOptions(_Lenient):
    """This service's own request options."""

    task: Literal["caption", "vqa", "ocr", "document", "grounding", "chart"] | None = None
    confidence_threshold: float | None = None
    disable_fallback: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    messages: list[ChatMessage]
    max_tokens: POSITIVE_INT32 | None = Field(None, description="tokens to generate at most; unset: until the "
                                                                 "answer or the context ends")
    max_completion_tokens: POSITIVE_INT32 | None = Field(None, description="as max_tokens (wins when both are given)")
    temperature: float | None = None
    top_p: float | None = None
    top_k: INT32 | None = Field(None, description="vLLM's extra: sample among the k most likely tokens (0: off)")
    repetition_penalty: float | None = Field(None, description="vLLM's extra: penalty for repeated tokens (1: off)")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: INT32 | None = None
    seed: INT64 | None = None
    stop: str | list[str] | None = None
    n: INT32 = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatBody | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="accepted; an answer makes at most one call")
    user: str | None = Field(None, description="accepted; not used")
    vlm: ServiceOptions | None = None


# ----- errors ----------------------------------------------------------------------------------

class HttpError(Exception):
    """An error in OpenAI's shape; `retry_after_s` set only where the request provably did no work."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.code = status, kind, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}

    def headers(self) -> dict[str, str]:
        """What tells the openai SDK exactly what to retry: it retries 408, 409, 429 and 5xx unless
        `x-should-retry` says otherwise, after `retry-after-ms` when given."""
        if self.retry_after_s is None:
            return {"x-should-retry": "false"}
        return {"x-should-retry": "true", "retry-after-ms": str(int(self.retry_after_s * 1000)),
                "retry-after": str(max(1, round(self.retry_after_s)))}

    @classmethod
    def of(cls, error: ApiError, names: "ParamNames") -> "HttpError":
        status, kind = STATUS_TO_HTTP.get(error.code, (500, "server_error"))
        param = names.public(error.violations[0][0]) if error.violations else None
        message = error.message
        for field, _ in error.violations:  # the message names the fields as the caller wrote them
            message = message.replace(f"{field}:", f"{names.public(field)}:")
        return cls(status, kind, message, param, error.code.name.lower(), error.retry_after_s)


def bad_request(message: str, param: str | None) -> HttpError:
    return HttpError(400, "invalid_request_error", message, param, "invalid_argument")


# What pydantic puts in an error's location for the branch of a union it tried ("str",
# "list[ContentPart]", "NamedToolChoice"): no field the caller wrote.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|(list|dict|literal)\[.*\]|[A-Z]\w*)$")


def validation_problems(errors: list[dict]) -> HttpError:
    """pydantic's errors as one 400, naming the first field as the caller wrote it. A union (a
    message's content: text or a list of parts) fails in each branch: the deepest error comes first,
    the caller's mistake inside a part rather than "not a string"."""
    def path(error) -> str:
        return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
                       if not (isinstance(part, str) and _UNION_BRANCH.match(part))).lstrip(".")

    errors = sorted(errors, key=lambda error: -len(error["loc"]))

    def problem(error) -> str:
        name = path(error)
        if error["type"] == "extra_forbidden" and name in UNSERVED:
            return f"{name}: {UNSERVED[name]}; leave it out"
        if error["type"] == "extra_forbidden":
            return f"{name}: not a field of a chat completion request here; leave it out"
        return f"{name}: {error['msg']}"

    return bad_request(f"invalid request: {'; '.join(problem(e) for e in errors)}", path(errors[0]) or None)


class ParamNames:
    """The public API's field paths (in ApiError violations) as the caller's OpenAI field names."""

    _RULES = [
        (re.compile(r"^messages\[(\d+)\]\.parts\[(\d+)\]\.image(\.data|\.url)?$"), r"messages[\1].content[\2].image_url.url"),
        (re.compile(r"^messages\[(\d+)\]\.parts\[(\d+)\]\.video\.(data|url)$"), r"messages[\1].content[\2].video_url.url"),
        (re.compile(r"^messages\[(\d+)\]\.parts\[(\d+)\]\.video\.(fps|max_frames)$"),
         r"messages[\1].content[\2].video_url.\3"),
        (re.compile(r"^messages\[(\d+)\]\.parts\[(\d+)\]\.video$"), r"messages[\1].content[\2]"),
        (re.compile(r"^messages\[(\d+)\]\.parts\[(\d+)\](\.text)?$"), r"messages[\1].content[\2]\3"),
        (re.compile(r"^messages\[(\d+)\]\.parts$"), r"messages[\1].content"),
        (re.compile(r"^messages\[(\d+)\]\.tool_calls\[(\d+)\]\.(name|arguments)$"), r"messages[\1].tool_calls[\2].function.\3"),
        (re.compile(r"^config\.response_format$"), "response_format"),
        (re.compile(r"^config\.(\w+)$"), r"\1"),
        (re.compile(r"^tools\[(\d+)\]\.(name|description|parameters)$"), r"tools[\1].function.\2"),
        (re.compile(r"^tool_choice\.name$"), "tool_choice.function.name"),
        (re.compile(r"^tool_choice\.mode$"), "tool_choice"),
        (re.compile(r"^task$"), "vlm.task"),
        (re.compile(r"^routing\.confidence_threshold$"), "vlm.confidence_threshold"),
        (re.compile(r"^routing$"), "vlm"),
        (re.compile(r"^detail$"), "messages"),
    ]

    def __init__(self, body: ChatCompletionRequest | None = None):
        # Messages whose content was one string: their one part is `content` itself.
        self.string_content = {i for i, m in enumerate(body.messages) if isinstance(m.content, str)} if body else set()
        self.max_tokens = "max_completion_tokens" if body is not None and body.max_completion_tokens else "max_tokens"

    def public(self, field: str) -> str:
        if field == "config.max_tokens":
            return self.max_tokens
        text = re.match(r"^messages\[(\d+)\]\.parts\[0\](\.text)?$", field)
        if text and int(text.group(1)) in self.string_content:
            return f"messages[{text.group(1)}].content"
        for pattern, replacement in self._RULES:
            if pattern.match(field):
                return pattern.sub(replacement, field)
        return field


# ----- translation -----------------------------------------------------------------------------

def _video(video_url: VideoURL | None, where: str) -> vlm_pb2.Video:
    """A video_url part as the public API's Video (`where`: the part's path)."""
    if video_url is None:
        raise bad_request("a video_url part needs video_url.url", f"{where}.video_url")
    # The proto reads 0 as unset: an explicit 0 is refused here, as the proto refuses other values out of range.
    for name, value in (("fps", video_url.fps), ("max_frames", video_url.max_frames)):
        if value == 0:
            raise bad_request(f"{name} 0 is out of range; leave {name} out for its default",
                              f"{where}.video_url.{name}")
    video = vlm_pb2.Video(fps=video_url.fps or 0, max_frames=video_url.max_frames or 0)
    data = _VIDEO_DATA_URL.match(video_url.url)
    if data:
        try:
            video.data = base64.b64decode(data.group(1), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the data URL's base64 does not decode", f"{where}.video_url.url") from None
    elif video_url.url.startswith("data:"):
        raise bad_request("a video data URL must be data:video/<type>;base64,<data> (data:image/gif;base64,<data> for "
                          "an animated GIF)", f"{where}.video_url.url")
    else:
        video.url = video_url.url
    return video


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
        if part.type == "video_url":
            parts.append(vlm_pb2.Part(video=_video(part.video_url, f"{where}.content[{j}]")))
            continue
        if part.image_url is None:
            raise bad_request("an image_url part needs image_url.url", f"{where}.content[{j}].image_url")
        url = part.image_url.url
        data = _DATA_URL.match(url)
        if data:
            try:
                image = vlm_pb2.Image(data=base64.b64decode(data.group(1), validate=True))
            except (binascii.Error, ValueError):
                raise bad_request("the data URL's base64 does not decode", f"{where}.content[{j}].image_url.url") from None
        elif url.startswith("data:"):
            raise bad_request("a data URL must be data:image/<type>;base64,<data>", f"{where}.content[{j}].image_url.url")
        else:
            image = vlm_pb2.Image(url=url)
        parts.append(vlm_pb2.Part(image=image))
        if part.image_url.detail:
            details.append(part.image_url.detail)
    return parts, details


def _message(message: ChatMessage, where: str) -> tuple[vlm_pb2.Message, list[str]]:
    parts, details = _parts(message.content, where)
    if message.role == "assistant" and message.tool_calls and isinstance(message.content, str) and not message.content:
        parts = []  # an assistant turn that only called tools: "" is no text
    translated = vlm_pb2.Message(role="system" if message.role == "developer" else message.role, parts=parts,
                                 tool_call_id=message.tool_call_id or "")
    for call in message.tool_calls or ():
        translated.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
    return translated, details


def to_generate_request(body: ChatCompletionRequest, request_id: str) -> vlm_pb2.GenerateRequest:
    """The chat completion as the public API's request (what gRPC callers send)."""
    if body.n != 1:
        raise bad_request(f"n={body.n}: this service returns one choice per request; send n=1 (or leave it out)", "n")
    messages, details = [], []
    for i, message in enumerate(body.messages):
        translated, asked = _message(message, f"messages[{i}]")
        messages.append(translated)
        details += asked
    if len(set(details)) > 1:
        raise bad_request(f"images ask for different details ({', '.join(sorted(set(details)))}); this service sizes "
                          "every image of a request alike: give one detail", "messages")
    config = vlm_pb2.GenerationConfig(max_tokens=body.max_completion_tokens or body.max_tokens or 0,
                                      logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0)
    for name in ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty"):
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
    request = vlm_pb2.GenerateRequest(model=body.model, messages=messages, config=config, request_id=request_id,
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


# ----- answers ---------------------------------------------------------------------------------

def tool_calls(calls) -> list[dict]:
    return [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls]


def usage(counts) -> dict:
    return {"prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens,
            "total_tokens": counts.prompt_tokens + counts.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": counts.cached_tokens}}


def logprobs(entries) -> dict:
    """OpenAI's `choices[].logprobs` for these tokens."""
    def entry(token) -> dict:
        return {"token": token.token, "logprob": token.logprob, "bytes": list(token.bytes)}

    return {"content": [dict(entry(token), top_logprobs=[entry(top) for top in token.top_logprobs])
                        for token in entries], "refusal": None}


def extras(message) -> dict:
    """The service's own fields of a final answer (`vlm` in the response)."""
    found = {"confidence": message.confidence, "model_version": message.model_version,
             "route": json_format.MessageToDict(message.route, preserving_proto_field_name=True)}
    result = message.WhichOneof("result")
    if result:
        found["result"] = {result: json_format.MessageToDict(getattr(message, result), preserving_proto_field_name=True)}
    if message.result_error:
        found["result_error"] = message.result_error
    return found


def finish_reason(message) -> str:
    return "tool_calls" if message.tool_calls else FINISH_REASONS.get(message.finish_reason, "stop")


def completion(answer: vlm_pb2.GenerateResponse, created: int, with_logprobs: bool) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": None if answer.tool_calls else answer.text}
    if answer.tool_calls:
        message["tool_calls"] = tool_calls(answer.tool_calls)
    return {"id": f"chatcmpl-{answer.request_id}", "object": "chat.completion", "created": created,
            "model": answer.model, "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(answer),
                                                "logprobs": logprobs(answer.logprobs) if with_logprobs else None}],
            "usage": usage(answer.usage), "vlm": extras(answer)}


class CallMarkupFilter:
    """Holds back streamed text that may be a tool call's markup, so a stream carries a call as a
    `tool_calls` delta only, never as content. Text is sent as it comes until it could be the start
    of a call (either family's marker, or a bare JSON call opening the answer); from a marker on,
    everything is held until the end: dropped if the answer holds a call, else sent then."""

    MARKERS = ("<tool_call>", "[TOOL_CALLS]")

    def __init__(self, active: bool):
        self.active = active
        self.held = ""
        self.sent_any = False
        self.holding_all = False

    def feed(self, text: str) -> str:
        if not self.active:
            return text
        self.held += text
        if self.holding_all:
            return ""
        if not self.sent_any and self.held.lstrip().startswith("{"):
            self.holding_all = True
            return ""
        for marker in self.MARKERS:
            if marker in self.held:
                self.holding_all = True
                before, self.held = self.held.split(marker, 1)
                self.held = marker + self.held
                return self._send(before)
        # Keep back a suffix that may be a marker's beginning.
        keep = max((size for marker in self.MARKERS for size in range(len(marker) - 1, 0, -1)
                    if self.held.endswith(marker[:size])), default=0)
        ready, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return self._send(ready)

    def finish(self, has_calls: bool) -> str:
        """What is left to send as content once the answer is complete."""
        rest, self.held = ("" if has_calls else self.held), ""
        return self._send(rest)

    def _send(self, text: str) -> str:
        self.sent_any = self.sent_any or bool(text)
        return text
