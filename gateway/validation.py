"""Check a GenerateRequest before Triton is called; every problem becomes a named field violation."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import ClassVar
from urllib.parse import urlsplit

import grpc
from vlm.v1 import vlm_pb2

from gateway.errors import ApiError, invalid_argument
from gateway.settings import Settings
from vlm_serving.pipelines import ROUTER
from vlm_serving.preprocessing.chat import MAX_VIDEO_FPS, MAX_VIDEO_FRAMES
from vlm_serving.preprocessing.images import ImageError, ImageLimits, check_encoded
from vlm_serving.preprocessing.video import VideoError, VideoLimits, probe_sampling, probe_video
from vlm_serving import tasks, tools
from vlm_serving.generation import structured
from vlm_serving.generation.sampling import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
# Roles whose messages hold text only.
TEXT_ONLY_ROLES = ("system", "tool")
# A video's sampling (proto Video; unset, 0, is the default): frames per second, and the most
# frames, at least 2 (Qwen2.5-VL reads frames in temporal pairs).
DEFAULT_VIDEO_FPS = 2.0
DEFAULT_VIDEO_FRAMES = 32
VIDEO_FRAMES = range(2, MAX_VIDEO_FRAMES + 1)

# ASCII only: the id goes back in gRPC metadata, which allows nothing else.
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


@dataclass
class ImageSource:
    """One image of the request: its bytes, or a URL still to fetch; `field` names it for errors."""

    kind: ClassVar[str] = "image"
    field: str
    data: bytes | None = None
    url: str | None = None

    def max_bytes(self, settings: Settings) -> int:
        return settings.max_image_bytes

    def problem(self, data: bytes, settings: Settings) -> str | None:
        """Why these (fetched) bytes cannot be this image, or None."""
        return check_image_bytes(data, settings)


@dataclass
class VideoSource(ImageSource):
    """One video of the request and how to sample it (defaults filled in)."""

    kind: ClassVar[str] = "video"
    fps: float = DEFAULT_VIDEO_FPS
    max_frames: int = DEFAULT_VIDEO_FRAMES

    def max_bytes(self, settings: Settings) -> int:
        return settings.max_video_bytes

    def problem(self, data: bytes, settings: Settings) -> str | None:
        return check_video_bytes(data, settings, (self.fps, self.max_frames))


@dataclass
class ValidatedRequest:
    model: str
    ensemble: str
    request_id: str
    # Chat messages as the preprocessor takes them ({"type": "image"} parts in image order).
    messages: list[dict] = field(default_factory=list)
    images: list[ImageSource] = field(default_factory=list)
    # Clips in part order ({"type": "video", "fps": ..., "max_frames": ...} parts in the messages).
    videos: list[VideoSource] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    # "auto", "low" or "high"; None: the model's default.
    detail: str | None = None
    # Model "auto" only: its confidence threshold (None: the server's) and whether it may fall back.
    confidence_threshold: float | None = None
    fallback: bool | None = None
    # A task's name (vlm_serving/tasks.py); None: free chat.
    task: str | None = None
    # Functions shown to the model (none when tool_choice is NONE); calls are parsed from the answer.
    tools: list = field(default_factory=list)


TASKS = {getattr(vlm_pb2, f"TASK_{name.upper()}"): name for name in tasks.TASKS}
TASK_NAMES = [f"TASK_{name.upper()}" for name in tasks.TASKS]
TOOL_CHOICES = {vlm_pb2.ToolChoice.TOOL_CHOICE_MODE_UNSPECIFIED: tools.AUTO, vlm_pb2.ToolChoice.TOOL_CHOICE_AUTO: tools.AUTO,
                vlm_pb2.ToolChoice.TOOL_CHOICE_NONE: tools.NONE, vlm_pb2.ToolChoice.TOOL_CHOICE_REQUIRED: tools.REQUIRED,
                vlm_pb2.ToolChoice.TOOL_CHOICE_NAMED: tools.NAMED}
DETAILS = {vlm_pb2.IMAGE_DETAIL_AUTO: "auto", vlm_pb2.IMAGE_DETAIL_LOW: "low", vlm_pb2.IMAGE_DETAIL_HIGH: "high"}


FORMAT_TYPES = {
    vlm_pb2.ResponseFormat.RESPONSE_FORMAT_TYPE_UNSPECIFIED: structured.TEXT,
    vlm_pb2.ResponseFormat.RESPONSE_FORMAT_TEXT: structured.TEXT,
    vlm_pb2.ResponseFormat.RESPONSE_FORMAT_JSON_OBJECT: structured.JSON_OBJECT,
    vlm_pb2.ResponseFormat.RESPONSE_FORMAT_JSON_SCHEMA: structured.JSON_SCHEMA,
    vlm_pb2.ResponseFormat.RESPONSE_FORMAT_REGEX: structured.REGEX,
    vlm_pb2.ResponseFormat.RESPONSE_FORMAT_CHOICE: structured.CHOICE,
}


def _compact(schema: str) -> str:
    """Compact JSON in the caller's order (equal schemas share one compiled grammar; the order of
    properties is the order the model writes them); text that is not JSON stays, for the checks to name."""
    try:
        return json.dumps(json.loads(schema), separators=(",", ":"))
    except json.JSONDecodeError:
        return schema


def response_format(message) -> structured.ResponseFormat:
    """The proto's format; an unknown type stays unknown, for `violations` to name."""
    schema = _compact(message.json_schema) if message.json_schema else ""
    return structured.ResponseFormat(type=FORMAT_TYPES.get(message.type, f"unknown type {message.type}"),
                                     schema=schema, pattern=message.regex, choices=tuple(message.choices))


def sampling_params(config, stream: bool, default_max_tokens: int | None = None) -> SamplingParams:
    """The proto's config; fields left unset (or 0 where 0 is out of range) stay None: the
    model's defaults apply to them (`vlm_serving.generation.sampling.SamplingDefaults`). An unset
    max_tokens is the deployment's default, or None: until the answer or the context ends."""
    def present(name: str):
        return getattr(config, name) if config.HasField(name) else None

    return SamplingParams(
        response_format=response_format(config.response_format),
        max_tokens=config.max_tokens or default_max_tokens,
        temperature=present("temperature"),
        top_p=present("top_p") or None,
        top_k=present("top_k"),
        seed=present("seed"),
        stop=tuple(config.stop),
        repetition_penalty=present("repetition_penalty") or None,
        presence_penalty=present("presence_penalty") or None,
        frequency_penalty=present("frequency_penalty") or None,
        logprobs=config.logprobs,
        top_logprobs=config.top_logprobs,
        stream=stream,
    )


def default_max_tokens(task: str | None, settings: Settings) -> int | None:
    """max_tokens for a request that leaves it unset: the deployment's default (None: until the
    answer or the context ends); with a task, the task's own (tasks.DEFAULT_MAX_TOKENS, sized for
    its answers) where the deployment's is unset or larger. Never over the deployment's limit."""
    if task is None:
        return settings.default_max_tokens
    return min(tasks.DEFAULT_MAX_TOKENS[task], settings.default_max_tokens or settings.max_tokens_limit,
               settings.max_tokens_limit)


DEFAULT_PORTS = {"http": 80, "https": 443}


def _allowlist_entry(entry: str) -> tuple[str, int | None]:
    """("host", port) of an allowlist entry `host` or `host:port` (port None: the scheme's default)."""
    parts = urlsplit(f"//{entry.strip().lower()}")
    return parts.hostname or "", parts.port


def check_url(url: str, settings: Settings, kind: str = "image") -> str | None:
    """Why the `kind` ("image" or "video") at `url` may not be fetched, or None when it may (addresses
    are checked when fetching). Images and videos share the allowlist."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in DEFAULT_PORTS:
        return f"only http(s) {kind} URLs are fetched, got scheme {parts.scheme!r}"
    if parts.username or parts.password:
        return f"{kind} URLs may not carry credentials"
    host = (parts.hostname or "").lower()
    if not host:
        return "the URL names no host"
    port = port or DEFAULT_PORTS[parts.scheme]
    entries = [_allowlist_entry(entry) for entry in settings.image_url_allowlist]
    if not any(host == allowed and port == (allowed_port or DEFAULT_PORTS[parts.scheme])
               for allowed, allowed_port in entries):
        if any(host == allowed for allowed, _ in entries):
            return f"port {port} of {host!r} is not on this service's image URL allowlist"
        return (
            f"host {host!r} is not on this service's image URL allowlist "
            f"({', '.join(sorted(settings.image_url_allowlist)) or 'empty'}); send the {kind} bytes in {kind}.data "
            "instead"
        )
    return None


def holds_video(request, settings: Settings) -> bool:
    """Whether the request has a video part (whose header `validate` probes: about 1 ms, up to 0.1 s
    for a long WebM recorded live, whose length comes from scanning its packets). Messages over the
    limits are not looked into: `validate` refuses them unread."""
    return len(request.messages) <= settings.max_messages and any(
        len(message.parts) <= settings.max_parts_per_message
        and any(part.WhichOneof("kind") == "video" for part in message.parts) for message in request.messages)


def validate(request, settings: Settings, stream: bool) -> ValidatedRequest:
    if not request.model:
        raise invalid_argument([("model", f"required; one of {', '.join(sorted(settings.models))}")])
    if request.model not in settings.models:
        raise ApiError(
            grpc.StatusCode.NOT_FOUND,
            f"model {request.model!r} is not served here; available: {', '.join(sorted(settings.models))}",
        )
    violations: list[tuple[str, str]] = []
    if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
        violations.append(("request_id", "1 to 128 ASCII letters, digits and _.:/- characters"))
    messages, images, videos = conversation(request.messages, settings, violations)
    image_parts = sum(1 for m in messages for c in m["content"] if c["type"] == "image")
    if image_parts > settings.max_images:
        violations.append(("messages", f"{image_parts} images is over the limit of {settings.max_images} per request"))
    video_parts = sum(1 for m in messages for c in m["content"] if c["type"] == "video")
    task = TASKS.get(request.task)
    params = sampling_params(request.config, stream, default_max_tokens(task, settings))
    violations += [(f"config.{name}", message) for name, message in params.violations(settings.max_tokens_limit)]
    if request.detail != vlm_pb2.IMAGE_DETAIL_UNSPECIFIED and request.detail not in DETAILS:
        violations.append(("detail", f"{request.detail} is not an ImageDetail value; use AUTO, LOW or HIGH"))
    routed = settings.models[request.model] == ROUTER
    if request.HasField("routing") and not routed:
        violations.append(("routing", f"only model {ROUTER!r} routes; {request.model!r} answers itself"))
    threshold = request.routing.confidence_threshold if request.routing.HasField("confidence_threshold") else None
    if threshold is not None and not -100.0 <= threshold <= 0.0:
        violations.append(("routing.confidence_threshold",
                           f"{threshold:g} is out of range; a mean log-probability per token, -100 to 0"))
    if request.task and task is None:
        violations.append(("task", f"{request.task} is not a Task value; use one of {', '.join(TASK_NAMES)}"))
    if task:
        if params.response_format.constrained:
            violations.append(("config.response_format", f"task {task} shapes its own answer; leave response_format unset"))
        if video_parts and task not in tasks.VIDEO_TASKS:
            violations.append(("task", f"task {task} reads images only; send the video's frames as images, "
                                       f"or ask for {' or '.join(tasks.VIDEO_TASKS)}, which read videos too"))
        elif not image_parts and not video_parts:
            needs = "one image or video" if task in tasks.VIDEO_TASKS else "one image"
            violations.append(("messages", f"task {task} needs at least {needs}"))
        params = replace(params, response_format=tasks.output_format(task, image_parts))
    tool_list = [tools.Tool(t.name, t.description, _compact(t.parameters) if t.parameters else tools.Tool.parameters)
                 for t in request.tools]
    choice = TOOL_CHOICES.get(request.tool_choice.mode)
    if choice is None:
        violations.append(("tool_choice.mode", f"{request.tool_choice.mode} is not a ToolChoice.Mode value"))
        choice = tools.AUTO
    tool_problems = tools.violations(tool_list, choice, request.tool_choice.name)
    violations += tool_problems
    if choice in (tools.REQUIRED, tools.NAMED):
        if params.response_format.constrained:
            violations.append(("tool_choice", f"tool_choice {choice} shapes the answer as a call; leave "
                                              "config.response_format and task unset"))
        if not tool_problems:  # the call's format is built from the tools' parameters: valid ones only
            params = replace(params, response_format=tools.call_format(tool_list, choice, request.tool_choice.name))
    if violations:
        raise invalid_argument(violations)
    return ValidatedRequest(
        model=request.model,
        ensemble=settings.models[request.model],
        request_id=request.request_id or uuid.uuid4().hex,
        messages=messages,
        images=images,
        videos=videos,
        params=params,
        detail=DETAILS.get(request.detail),
        confidence_threshold=threshold,
        fallback=(not request.routing.disable_fallback) if routed else None,
        task=task,
        tools=tool_list if choice != tools.NONE else [],
    )


def conversation(messages, settings: Settings,
                 violations: list) -> tuple[list[dict], list[ImageSource], list[VideoSource]]:
    """The messages as the preprocessor takes them and the images and videos to fetch, every problem
    added to `violations`. Counts are checked before anything is iterated: a flood of messages, parts
    or videos (each of which is probed) is refused at the cost of reading its lengths."""
    if not messages:
        violations.append(("messages", "at least one message is required"))
    if len(messages) > settings.max_messages:
        violations.append(("messages", f"{len(messages)} messages is over the limit of {settings.max_messages}"))
        return [], [], []
    floods = [(f"messages[{i}].parts", f"{len(m.parts)} parts is over the limit of {settings.max_parts_per_message} "
                                       "per message") for i, m in enumerate(messages) if len(m.parts) > settings.max_parts_per_message]
    total = sum(len(m.parts) for m in messages)
    if total > settings.max_parts and not floods:
        floods.append(("messages", f"{total} parts is over the limit of {settings.max_parts} per request"))
    video_count = sum(part.WhichOneof("kind") == "video" for m in messages for part in m.parts) if not floods else 0
    if video_count > settings.max_videos:
        floods.append(("messages", f"{video_count} videos is over the limit of {settings.max_videos} per request"))
    if floods:
        violations += floods
        return [], [], []
    # The calls of the last assistant message that tool messages may still answer (each once).
    converted, images, videos, text_chars, open_calls = [], [], [], 0, set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role not in ROLES:
            violations.append((f"{where}.role", f"{message.role!r} is not one of {', '.join(ROLES)}"))
        if not message.parts and not message.tool_calls:
            violations.append((f"{where}.parts", "at least one part (text, image or video) is required"))
        content = []
        for j, part in enumerate(message.parts):
            path = f"{where}.parts[{j}]"
            kind = part.WhichOneof("kind")
            if kind == "text":
                if not part.text:
                    violations.append((f"{path}.text", "empty; leave the part out"))
                text_chars += len(part.text)
                content.append({"type": "text", "text": part.text})
            elif kind == "image":
                if message.role in TEXT_ONLY_ROLES:
                    violations.append((f"{path}.image", f"a {message.role} message holds text only; send images in "
                                                        "a user message"))
                    continue
                source = image_source(part.image, f"{path}.image", settings, violations)
                if source is not None:
                    images.append(source)
                content.append({"type": "image"})
            elif kind == "video":
                if message.role != "user":
                    violations.append((f"{path}.video", f"videos go in user messages only, not in a message of role "
                                                        f"{message.role!r}"))
                    continue
                fps, max_frames = video_sampling(part.video)
                source = video_source(part.video, fps, max_frames, f"{path}.video", settings, violations)
                if source is not None:
                    videos.append(source)
                content.append({"type": "video", "fps": fps, "max_frames": max_frames})
            else:
                violations.append((path, "set text, image or video"))
        entry = {"role": message.role, "content": content}
        if message.role == "assistant":
            open_calls = set()
        if message.tool_calls:
            entry["tool_calls"], chars = tool_calls(message, where, violations, settings.max_prompt_chars)
            text_chars += chars
            open_calls = {call["id"] for call in entry["tool_calls"]}
        if message.role == "tool":
            if not message.tool_call_id:
                violations.append((f"{where}.tool_call_id", "required in a tool message: the id of the call it answers"))
            elif message.tool_call_id not in open_calls:
                violations.append((f"{where}.tool_call_id", f"{message.tool_call_id!r} is not the id of a call of the "
                                                            "last assistant message still unanswered"))
            open_calls.discard(message.tool_call_id)
            entry["tool_call_id"] = message.tool_call_id
        elif message.tool_call_id:
            violations.append((f"{where}.tool_call_id", "only a tool message answers a call"))
        converted.append(entry)
    if text_chars > settings.max_prompt_chars:
        violations.append(("messages", f"{text_chars} characters of text is over the limit of {settings.max_prompt_chars}"))
    return converted, images, videos


def tool_calls(message, where: str, violations: list, max_chars: int) -> tuple[list[dict], int]:
    """An assistant message's earlier calls as the preprocessor takes them, and their characters
    (arguments longer than the text budget are not parsed: the budget refuses them)."""
    if message.role != "assistant":
        violations.append((f"{where}.tool_calls", "only an assistant message carries tool calls"))
    if len(message.tool_calls) > tools.MAX_CALLS:
        violations.append((f"{where}.tool_calls", f"{len(message.tool_calls)} calls is over the limit of "
                                                  f"{tools.MAX_CALLS} per message"))
        return [], 0
    calls, chars = [], 0
    for k, call in enumerate(message.tool_calls):
        path = f"{where}.tool_calls[{k}]"
        if not tools.NAME.fullmatch(call.name):
            violations.append((f"{path}.name", f"{call.name!r}: 1 to 64 letters, digits, '_' or '-'"))
        if not tools.CALL_ID.fullmatch(call.id):
            violations.append((f"{path}.id", "1 to 64 letters, digits, '_' or '-': the id the answer gave the call"))
        try:
            arguments = json.loads(call.arguments) if len(call.arguments) <= max_chars else {}
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            violations.append((f"{path}.arguments", "a JSON object, as the answer gave it"))
        chars += len(call.name) + len(call.arguments)
        calls.append({"id": call.id, "name": call.name, "arguments": call.arguments})
    return calls, chars


def check_image_bytes(data: bytes, settings: Settings) -> str | None:
    """Why these bytes cannot be an image here, or None (full decoding happens in Triton)."""
    try:
        check_encoded(data, ImageLimits(max_bytes=settings.max_image_bytes))
    except ImageError as exc:
        return str(exc)
    return None


def image_source(image, path: str, settings: Settings, violations: list) -> ImageSource | None:
    source = image.WhichOneof("source")  # "data" or "url"
    if source is None:
        violations.append((path, "set either data or url"))
        return None
    value = getattr(image, source)
    problem = check_image_bytes(value, settings) if source == "data" else check_url(value, settings)
    if problem:
        violations.append((f"{path}.{source}", problem))
        return None
    return ImageSource(field=f"{path}.{source}", **{source: value})


def video_sampling(video) -> tuple[float, int]:
    """The video's fps and max_frames with the defaults for unset (0) ones. fps, a float32 on the
    wire, is read as the shortest decimal of its precision: 0.3 stays 0.3, not 0.30000001192."""
    return float(f"{video.fps:.7g}") or DEFAULT_VIDEO_FPS, video.max_frames or DEFAULT_VIDEO_FRAMES


def check_video_bytes(data: bytes, settings: Settings, sampling: tuple[float, int] | None) -> str | None:
    """Why these bytes cannot be a video here, or None, from what needs no decoding (decoding happens
    in Triton): size, magic bytes, the container's header (video stream, codec, frame size, length),
    and with `sampling` (fps, max_frames) the frames it would take against the pixel budget per clip."""
    limits = VideoLimits(max_bytes=settings.max_video_bytes)
    try:
        probe_video(data, limits) if sampling is None else probe_sampling(data, *sampling, limits)
    except VideoError as exc:
        return str(exc).removeprefix("video 0: ")  # the field names the video
    return None


def video_source(video, fps: float, max_frames: int, path: str, settings: Settings,
                 violations: list) -> VideoSource | None:
    sampling_ok = True
    if not 0 < fps <= MAX_VIDEO_FPS:  # NaN too
        violations.append((f"{path}.fps", f"{fps:g} is out of range; frames to sample per second, greater than 0 "
                                          f"and at most {MAX_VIDEO_FPS:g} (unset: {DEFAULT_VIDEO_FPS:g})"))
        sampling_ok = False
    if max_frames not in VIDEO_FRAMES:
        violations.append((f"{path}.max_frames", f"{max_frames} is out of range; the most frames to sample, "
                                                 f"{VIDEO_FRAMES.start} to {VIDEO_FRAMES.stop - 1} "
                                                 f"(unset: {DEFAULT_VIDEO_FRAMES})"))
        sampling_ok = False
    source = video.WhichOneof("source")  # "data" or "url"
    if source is None:
        violations.append((path, "set either data or url"))
        return None
    value = getattr(video, source)
    if source == "url":
        problem = check_url(value, settings, "video")
    else:  # the pixel budget only for a sampling that is valid: it is refused on its own otherwise
        problem = check_video_bytes(value, settings, (fps, max_frames) if sampling_ok else None)
    if problem:
        violations.append((f"{path}.{source}", problem))
    if problem or not sampling_ok:
        return None
    return VideoSource(field=f"{path}.{source}", fps=fps, max_frames=max_frames, **{source: value})
