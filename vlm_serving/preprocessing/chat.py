"""Chat messages: validation and each family's conventions, before the checkpoint's own chat template
renders them (vlm_serving/preprocessing/prompt.py).

Messages use the Hugging Face chat shape that both families' templates understand:
`[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]`.
Content may also be a plain string. Image parts carry no data: the k-th image part refers to the
k-th encoded image sent beside the messages; likewise the k-th `{"type": "video", "fps": 2.0,
"max_frames": 32}` part (user messages only) to the k-th encoded clip, sampled at `fps` frames a
second into at most `max_frames` frames. A tool loop adds two shapes (OpenAI's, flattened):
`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "name": "get_weather",
"arguments": "{\"city\": \"Paris\"}"}]}` and `{"role": "tool", "content": "21", "tool_call_id": "call_1"}`.

Pixtral's public template concatenates the system message as a string, and neither family's
renders tool turns, so `template_messages` hands the template turns it does render: text-only
messages as one string, tool calls and results written as the family writes them
(vlm_serving/tools.py).
"""

from __future__ import annotations

import json
from typing import Any

from vlm_serving import tools

ROLES = ("system", "user", "assistant", "tool")
# Roles whose messages hold text only: instructions and tools' results.
TEXT_ONLY_ROLES = ("system", "tool")
# Calls per assistant message (protos/vlm/v1/vlm.proto, Message.tool_calls).
# How each family joins the text parts of a system or tool message into the one string its
# template takes: Qwen's templates write parts one after another; Mistral's own tokenizer
# (mistral_common) puts a blank line between text chunks.
PART_SEPARATORS = {"qwen2_5_vl": "", "pixtral": "\n\n"}


class MessageError(ValueError):
    """Messages that cannot be rendered; the message is meant for the caller."""


def parse_messages(raw: bytes | str) -> list[dict[str, Any]]:
    """Parse and validate the MESSAGES tensor (UTF-8 JSON). Every message comes back with a
    "content" (None only on an assistant message that carries tool_calls)."""
    try:
        messages = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"messages: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages: expected a non-empty JSON list of {role, content} objects")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            raise MessageError(f"{where}: expected an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise MessageError(f"{where}.role: {message['role']!r} is not one of {', '.join(ROLES)}")
        _check_calls(message, where)
        _check_content(message, where)
    _check_answers(messages)
    return messages


def _check_content(message: dict[str, Any], where: str) -> None:
    role = message["role"]
    content = message.setdefault("content", None)
    if content is None:
        if role == "assistant" and message.get("tool_calls"):
            return
        raise MessageError(f"{where}.content: required (a string or a list of parts); only an assistant "
                           "message with tool_calls may leave it out")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise MessageError(f"{where}.content: expected a string or a list of parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind == "image" and role in TEXT_ONLY_ROLES:
            raise MessageError(f"{where}.content[{j}]: a {role} message holds text only; send images in a user message")
        if kind == "image":
            continue
        if kind == "video":
            _check_video_part(part, role, f"{where}.content[{j}]")
            continue
        raise MessageError(
            f"{where}.content[{j}]: expected {{'type': 'text', 'text': str}}, {{'type': 'image'}} or "
            "{'type': 'video', 'fps': float, 'max_frames': int}"
        )


# Sampling bounds of a video part (protos/vlm/v1/vlm.proto, Video); the gateway fills in the defaults.
MAX_VIDEO_FPS = 30.0
MAX_VIDEO_FRAMES = 256


def _check_video_part(part: dict[str, Any], role: str, where: str) -> None:
    if role != "user":
        raise MessageError(f"{where}: a {role} message cannot hold a video; send videos in a user message")
    fps, max_frames = part.get("fps"), part.get("max_frames")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_VIDEO_FPS:
        raise MessageError(f"{where}.fps: {fps!r}: frames to sample per second, greater than 0 and at most "
                           f"{MAX_VIDEO_FPS:g}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or not 2 <= max_frames <= MAX_VIDEO_FRAMES:
        raise MessageError(f"{where}.max_frames: {max_frames!r}: the most frames to sample, 2 to {MAX_VIDEO_FRAMES}")


def _check_calls(message: dict[str, Any], where: str) -> None:
    """tool_calls only on assistant messages, each {id (optional), name, arguments (JSON object text)};
    tool_call_id only on tool messages."""
    if "tool_call_id" in message and message["role"] != "tool":
        raise MessageError(f"{where}.tool_call_id: only a tool message answers a call (this is a "
                           f"{message['role']} message)")
    calls = message.get("tool_calls")
    if calls is None:
        return
    if message["role"] != "assistant":
        raise MessageError(f"{where}.tool_calls: only an assistant message carries tool calls")
    if not isinstance(calls, list):
        raise MessageError(f"{where}.tool_calls: expected a list of {{'id', 'name', 'arguments'}} objects")
    if len(calls) > tools.MAX_CALLS:
        raise MessageError(f"{where}.tool_calls: {len(calls)} calls is over the limit of {tools.MAX_CALLS}")
    ids = []
    for j, call in enumerate(calls):
        path = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise MessageError(f"{path}: expected an object with 'id', 'name' and 'arguments'")
        name, arguments, call_id = call.get("name"), call.get("arguments"), call.get("id", "")
        if not isinstance(name, str) or not tools.NAME.fullmatch(name):
            raise MessageError(f"{path}.name: {name!r}: 1 to 64 letters, digits, '_' or '-'")
        if not isinstance(arguments, str) or not isinstance(_json_or_none(arguments), dict):
            raise MessageError(f"{path}.arguments: expected a JSON object as text, e.g. '{{\"city\": \"Paris\"}}'")
        if not isinstance(call_id, str) or (call_id and not tools.CALL_ID.fullmatch(call_id)):
            raise MessageError(f"{path}.id: {call_id!r}: 1 to 64 letters, digits, '_' or '-' (or none)")
        if call_id and call_id in ids:
            raise MessageError(f"{path}.id: {call_id!r} is given twice in this message")
        ids.append(call_id)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _check_answers(messages: list[dict[str, Any]]) -> None:
    """Each tool message answers, once, a call of the assistant message its run of tool messages follows."""
    asking, answered = None, {}  # the assistant message whose calls are being answered; id -> answer's index
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message["role"] != "tool":
            asking, answered = (i, {}) if message.get("tool_calls") else (None, {})
            continue
        if asking is None:
            raise MessageError(f"{where}: a tool message answers a call of the assistant message right before it "
                               "(tool messages in a row answer that message's calls); no tool_calls precede it")
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise MessageError(f"{where}.tool_call_id: required on a tool message: the id of the call it answers")
        ids = [call.get("id", "") for call in messages[asking]["tool_calls"]]
        if call_id not in ids:
            raise MessageError(f"{where}.tool_call_id: {call_id!r} is not a call of messages[{asking}] "
                               f"(its calls: {', '.join(filter(None, ids)) or 'none with an id'})")
        if call_id in answered:
            raise MessageError(f"{where}.tool_call_id: {call_id!r} is answered twice (messages[{answered[call_id]}] too)")
        answered[call_id] = i


def template_messages(messages: list[dict[str, Any]], family: str, functions: list[dict] = ()) -> list[dict[str, Any]]:
    """Validated messages as the family's chat template takes them: system and tool messages' text
    as one string, the tools block in the system turn (tools.apply_tools), tool calls and results
    written as the family writes them (tools.tool_turns). Pixtral's order rules are checked first,
    so that a refusal names the caller's message rather than the template's."""
    if family == "pixtral":
        _check_mistral_order(messages)
    separator = PART_SEPARATORS[family]
    joined = [{**message, "content": joined_text(message["content"], separator)} if message["role"] in TEXT_ONLY_ROLES
              else message for message in messages]
    return tools.tool_turns(tools.apply_tools(joined, list(functions), family), family)


def joined_text(content: str | list[dict[str, Any]], separator: str) -> str:
    """A text-only message's content as one string."""
    return content if isinstance(content, str) else separator.join(part["text"] for part in content)


def _check_mistral_order(messages: list[dict[str, Any]]) -> None:
    """Pixtral's template: one optional system message, first; then user and assistant turns
    alternating, from a user turn. Tool results take the user's turn (tools.tool_turns: a user
    message right after them joins it). The last message is one to answer, a user or tool message
    (as Mistral's own validator requires): the template writes the system message into the last
    user turn, and drops it when there is none."""
    template = "pixtral's chat template"
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if i > 0:
                raise MessageError(f"messages[{i}]: {template} takes one system message, first; "
                                   "merge it into messages[0]")
            continue
        if previous is None and role != "user":
            raise MessageError(f"messages[{i}]: {template} opens the conversation with a user message (after the "
                               f"optional system message); this is an {role} message")
        if role == previous and role in ("user", "assistant"):
            raise MessageError(f"messages[{i}]: {template} needs user and assistant turns to alternate; "
                               f"messages[{i - 1}] is {'an' if role == 'assistant' else 'a'} {role} message too "
                               "(join the two into one)")
        previous = role
    if previous is None:
        raise MessageError(f"messages: {template} needs a user message after the system message")
    if previous == "assistant":
        raise MessageError(f"messages[{len(messages) - 1}]: {template} answers a user or tool message last; "
                           "the conversation ends with an assistant message")


def media_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image and video parts, in reading order."""
    return [part for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part["type"] in ("image", "video")]


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(1 for part in media_parts(messages) if part["type"] == "image")


def video_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [part for part in media_parts(messages) if part["type"] == "video"]


def videos_as_frames(messages: list[dict[str, Any]], frame_counts: list[int]) -> list[dict[str, Any]]:
    """The messages with the k-th video part replaced by `frame_counts[k]` image parts: how a family
    without video input (Pixtral) reads a clip, its sampled frames as images in time order."""
    counts = iter(frame_counts)

    def parts(content):
        if not isinstance(content, list):
            return content
        return [image for part in content
                for image in ([{"type": "image"}] * next(counts) if part["type"] == "video" else [part])]

    return [{**message, "content": parts(message["content"])} for message in messages]
