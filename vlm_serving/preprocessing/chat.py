"""Chat messages: validation and rendering through the checkpoint's own chat template.

Messages use the Hugging Face chat shape that both families' templates understand:
`[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]`.
Content may also be a plain string. Image parts carry no data: the k-th image part refers to the
k-th encoded image sent beside the messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class MessageError(ValueError):
    """Messages that cannot be rendered; the message is meant for the caller."""


def parse_messages(raw: bytes | str) -> list[dict[str, Any]]:
    """Parse and validate the MESSAGES tensor (UTF-8 JSON)."""
    try:
        messages = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"messages: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages: expected a non-empty JSON list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise MessageError(f"messages[{i}]: expected an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise MessageError(f"messages[{i}].role: {message['role']!r} is not one of {', '.join(ROLES)}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise MessageError(f"messages[{i}].content: expected a string or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image":
                continue
            raise MessageError(
                f"messages[{i}].content[{j}]: expected {{'type': 'text', 'text': str}} or {{'type': 'image'}}"
            )
    return messages


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image"
    )


def load_chat_template(tokenizer: Any, checkpoint_dir: str | Path) -> str:
    """The checkpoint's chat template: the tokenizer's, else the processor's file beside it."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    directory = Path(checkpoint_dir)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text())["chat_template"]
    raise FileNotFoundError(f"{directory}: no chat template in the tokenizer or chat_template.jinja/json")


def prompt_ids(tokenizer: Any, chat_template: str, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt's token ids, one image placeholder per image part, ready for generation.

    Callers' text never becomes control tokens: `sanitize_control_tokens` (transformers' own
    guard) encodes any control token typed in a message (`<|im_start|>`, `[INST]`, `</s>`, an image
    placeholder, ...) as plain text, so only the template itself writes turns and placeholders.
    """
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=True, return_dict=False, add_generation_prompt=True,
            sanitize_control_tokens=True,
        )
    except Exception as exc:  # jinja's raise_exception, e.g. roles out of order
        raise MessageError(f"messages: the model's chat template refused them ({exc})") from None
