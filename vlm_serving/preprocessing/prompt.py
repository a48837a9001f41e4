"""Prompt token ids from chat messages with the checkpoint's own tokenizer and chat template, without
transformers: the `tokenizers` library on the checkpoint's tokenizer.json, and the template rendered
with jinja2 the way transformers renders it.

transformers (5.24) does the same with these two libraries underneath (`utils/chat_template_utils.py`:
a sandboxed jinja2 environment with its own helpers; `apply_chat_template(..., sanitize_control_tokens=True)`:
control tokens in callers' strings encoded as text). Doing it here keeps a preprocessing process free of
transformers and torch, which it would otherwise import only for this. The tests check equality with
`apply_chat_template` token for token, attacks included (tests/unit/test_lean_preprocessing.py).

Callers' text never becomes control tokens: before rendering, every control token found in a message
string is wrapped in private-use markers (transformers' own); after rendering, the marked ones are
encoded as plain text and only what the template wrote is encoded as control tokens.
"""

from __future__ import annotations

import ctypes
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from vlm_serving.checkpoint_config import read_json
from vlm_serving.preprocessing.chat import MessageError

# The private-use characters transformers wraps around control tokens found in callers' strings.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


def release_free_heap() -> None:
    """Hand the heap that parsing tokenizer.json freed back to the OS. glibc keeps it otherwise: about
    75 MiB resident for a vocabulary of Qwen2.5-VL's size (151,643 tokens), where the tokenizer itself
    holds about 50 (perf/memory_row.py measures it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing kept to hand back this way
        pass


class GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers' environment knows (it marks the
    assistant's text for training masks): rendered as its content, as transformers renders it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_content"), [], [], body).set_lineno(lineno)

    def _content(self, caller):
        return caller()


class TemplateDict:
    """`dict` in templates: builds dicts, and nothing else of the type is reachable."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` in templates, refusing underscore-prefixed attributes (no way to CPython internals)."""

    def __init__(*args, **kwargs):  # jinja's own signature trick: `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed attributes ({name!r})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' does not, and takes json.dumps' options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def template_environment() -> ImmutableSandboxedEnvironment:
    """transformers' chat-template environment: sandboxed and immutable, blocks trimmed, loop controls,
    and its helpers (tojson, raise_exception, strftime_now, dict, namespace)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=TemplateDict(),
                               namespace=TemplateNamespace)
    return environment


def load_chat_template(checkpoint_dir: str | Path, tokenizer_config: dict[str, Any]) -> str:
    """The checkpoint's chat template, where transformers' tokenizer finds it (chat_template.jinja, else
    tokenizer_config.json's, the "default" one of named templates), else the processor's chat_template.json."""
    directory = Path(checkpoint_dir)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates; tools go in the system turn here, so "default"
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    if template:
        return template
    if (directory / "chat_template.json").is_file():
        return read_json(directory, "chat_template.json")["chat_template"]
    raise FileNotFoundError(f"{directory}: no chat template (chat_template.jinja, tokenizer_config.json's "
                            "chat_template or chat_template.json)")


def named_special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """The special tokens a template sees by name (bos_token, eos_token, ..., a model's own such as
    image_token): tokenizer_config.json's `*_token` entries, as transformers passes them."""
    named = {key: value for key, value in tokenizer_config.items() if key.endswith("_token")}
    if isinstance(tokenizer_config.get("extra_special_tokens"), dict):
        named.update(tokenizer_config["extra_special_tokens"])
    return {key: value["content"] if isinstance(value, dict) else value for key, value in named.items()
            if isinstance(value, str) or (isinstance(value, dict) and "content" in value)}


def _literal_text(environment: ImmutableSandboxedEnvironment, template: str) -> str:
    """The template's literal text and string constants, joined by NULs so that no match spans two."""
    tree = environment.parse(template)
    literals = {node.data for node in tree.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in tree.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


def _alternation(tokens) -> str:
    """A regex matching any of `tokens`, longest first (a token wins over the tokens it holds)."""
    return "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)"


class PromptTokenizer:
    """The checkpoint's tokenizer and chat template: messages in, prompt token ids out."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, special_tokens: dict[str, str],
                 chat_control_tokens: list[str] | None = None, split_special_tokens: bool = False):
        self.tokenizer = tokenizer
        # transformers encodes without truncation or padding, whatever tokenizer.json says.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.split_special_tokens = split_special_tokens
        self.special_tokens = special_tokens
        environment = template_environment()
        self.template = environment.from_string(chat_template)
        added = list(tokenizer.get_added_tokens_decoder().values())
        # Control tokens, as transformers chooses them: the special tokens, and the added tokens the
        # tokenizer config lists as chat control tokens, else those the template itself spells out.
        if chat_control_tokens is not None:
            chosen = set(chat_control_tokens)
            controls = [token.content for token in added if token.special or token.content in chosen]
        else:
            literal = _literal_text(environment, chat_template)
            controls = [token.content for token in added
                        if token.special or (token.content in literal and not token.content.isspace())]
        self.control_pattern = re.compile(_alternation(controls))
        # After rendering: a marked added token, or a lone marker (a template's string method split a pair).
        self.marked_pattern = re.compile(
            f"{MARK_START}({_alternation(token.content for token in added)}){MARK_END}|[{MARK_START}{MARK_END}]")
        self.newline_ids = self._encode("\n")

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> PromptTokenizer:
        directory = Path(checkpoint_dir)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{directory / 'tokenizer.json'}: missing; the checkpoint's tokenizer is read from it")
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        release_free_heap()
        config = read_json(directory, "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
        return cls(tokenizer, load_chat_template(directory, config), named_special_tokens(config),
                   config.get("chat_control_tokens"), bool(config.get("split_special_tokens", False)))

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the checkpoint's tokenizer has no token {token!r}")
        return token_id

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The template's text for `messages` (no tools, no documents: vlm_serving/tools.py writes tools
        into the system turn), with the named special tokens."""
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception, e.g. roles out of order; the sandbox
            raise MessageError(f"messages: the model's chat template refused them ({exc})") from None

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt's token ids with the generation prompt, ready for generation; every control token
        in the messages' strings encoded as text."""
        # As transformers hands messages to a template: keys whose value is None dropped.
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        pieces = self.marked_pattern.split(self.render(self._marked(messages)))
        # [text, marked token, text, ..., text]; a lone marker's place holds None: it only breaks the text.
        ids = self._encode(pieces[0])
        for index, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = index % 2 == 1
            piece_ids = self._encode_piece(piece, as_text)
            if as_text and self.tokenizer.token_to_id(piece) in piece_ids:
                raise MessageError(f"messages: {piece!r} cannot be kept as text: this tokenizer makes it from plain text")
            ids += piece_ids
        return ids

    def _marked(self, value: Any) -> Any:
        """`value` (messages: lists and dicts of strings) with each control token in its strings wrapped in
        the markers, after dropping any marker a caller sent (none can forge a wrapped token)."""
        if isinstance(value, str):
            value = value.replace(MARK_START, "").replace(MARK_END, "")
            return self.control_pattern.sub(f"{MARK_START}\\g<0>{MARK_END}", value)
        if isinstance(value, dict):
            return {key: self._marked(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._marked(item) for item in value]
        return value

    def _encode(self, text: str, as_text: bool = False) -> list[int]:
        """`text`'s ids; `as_text`: special tokens in it encoded as their characters."""
        self.tokenizer.encode_special_tokens = as_text or self.split_special_tokens
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_piece(self, piece: str, as_text: bool) -> list[int]:
        # Encoded after a newline, then the newline's ids dropped: a piece from the middle of the prompt
        # gets no start-of-text treatment (SentencePiece's prefix space), as transformers encodes it.
        ids = self._encode("\n" + piece, as_text)
        if ids[: len(self.newline_ids)] == self.newline_ids:
            return ids[len(self.newline_ids):]
        return self._encode(piece, as_text)
