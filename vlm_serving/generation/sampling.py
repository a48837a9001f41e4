"""Per-request generation parameters, their bounds, and the text they turn tokens into."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from vlm_serving.generation.structured import ResponseFormat


# The most alternatives a token's log-probability may come with (OpenAI's bound).
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 64


@dataclass(frozen=True)
class Bound:
    """A parameter's range, for its check and its documentation (the HTTP API's OpenAPI schema)."""

    low: float
    high: float
    # The low end is excluded (on the wire it means "the model's default").
    low_open: bool = False
    note: str = ""

    def holds(self, value: float) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def describe(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]" + (f" ({self.note})" if self.note else "")


BOUNDS = {
    "temperature": Bound(0, 2, note="0 = greedy"),
    "top_p": Bound(0, 1, low_open=True),
    "top_k": Bound(0, 1000, note="0 = off"),
    "repetition_penalty": Bound(0, 2, low_open=True, note="1 = off"),
    "presence_penalty": Bound(-2, 2, note="0 = off"),
    "frequency_penalty": Bound(-2, 2, note="0 = off"),
    "top_logprobs": Bound(0, MAX_TOP_LOGPROBS),
}


class ParameterError(ValueError):
    """A generation parameter out of bounds; the message names it and the bound."""


def _g(value: float | None) -> str:
    return "unset" if value is None else f"{value:g}"


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for the sampling parameters it leaves unset.

    The checkpoint's `generation_config.json` decides, as plain transformers `generate` would
    read it (its values over transformers' global defaults; `do_sample` false means greedy);
    a checkpoint without one gets the service's defaults: greedy, no cuts, no penalty. Applied
    once, by the service's own per-row sampling: the batch's transformers `GenerationConfig`
    sets these fields to neutral values so the checkpoint's never apply a second time.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, values: dict) -> "SamplingDefaults":
        from transformers import GenerationConfig

        merged = {**GenerationConfig._get_default_generation_params(),
                  **{key: value for key, value in values.items() if value is not None}}
        sampling = bool(merged.get("do_sample"))
        return cls(
            temperature=float(merged.get("temperature") or 1.0) if sampling else 0.0,
            top_p=float(merged.get("top_p") or 1.0) if sampling else 1.0,
            top_k=int(merged.get("top_k") or 0) if sampling else 0,
            repetition_penalty=float(merged.get("repetition_penalty") or 1.0),
        )

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "SamplingDefaults":
        path = Path(checkpoint) / "generation_config.json"
        return cls.from_generation_config(json.loads(path.read_text()) if path.is_file() else {})

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. None: the model's default (`SamplingDefaults`), see `resolve`."""

    # None: until the model ends its answer or the context is full, at most the model's
    # max_tokens_limit (`BatchGenerator.resolve` turns it into a number from the prompt's length).
    max_tokens: int | None = None
    # 0 means greedy decoding (and makes top_p, top_k and seed irrelevant).
    temperature: float | None = None
    top_p: float | None = None
    # 0 means no top-k cut.
    top_k: int | None = None
    # None draws a fresh seed; a fixed seed with the same inputs repeats the same sample.
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    repetition_penalty: float | None = None
    # OpenAI's penalties over the answer so far: logit -= presence * (count > 0) + frequency * count.
    # None or 0: off.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Return each generated token's log-probability, and its top_logprobs most likely alternatives.
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    # The shape the answer must take (free text by default), enforced token by token.
    response_format: ResponseFormat = ResponseFormat()

    def resolve(self, defaults: SamplingDefaults, room: int | None = None) -> "SamplingParams":
        """Every unset sampling field from `defaults`; an unset max_tokens becomes `room` (the
        tokens the context leaves the answer) where it is given."""
        resolved = replace(self, **{name: getattr(defaults, name) for name in defaults.__dict__
                                    if getattr(self, name) is None})
        return resolved if self.max_tokens is not None or room is None else replace(resolved, max_tokens=room)

    def violations(self, max_tokens_limit: int) -> list[tuple[str, str]]:
        """(field, what is wrong) for every parameter out of bounds (unset ones are fine). Every
        request is checked: a message is built only for a check that fails."""
        problems = []
        if self.max_tokens is not None and not 1 <= self.max_tokens <= max_tokens_limit:
            problems.append(("max_tokens", f"max_tokens={self.max_tokens} must be in [1, {max_tokens_limit}] (unset: "
                                           "until the answer or the context ends)"))
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not bound.holds(value):
                problems.append((name, f"{name}={_g(value)} must be in {bound.describe()}"))
        if self.top_logprobs and not self.logprobs:
            problems.append(("top_logprobs", f"top_logprobs={self.top_logprobs} needs logprobs true (the alternatives "
                                             "come with each token's own)"))
        if len(self.stop) > MAX_STOP_SEQUENCES:
            problems.append(("stop", f"{len(self.stop)} stop sequences is over the limit of {MAX_STOP_SEQUENCES}"))
        if not all(0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            problems.append(("stop", f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters"))
        # A stop sequence inside a constrained answer would end it before its format is complete.
        if self.stop and self.response_format.constrained:
            problems.append(("stop", "stop sequences cannot end a constrained answer (a response_format, a task or a "
                                     "required tool call) before its format is complete; leave stop unset: the "
                                     "format decides where the answer ends"))
        return problems + [("response_format", message) for message in self.response_format.violations()]

    def validate(self, max_tokens_limit: int) -> None:
        problems = self.violations(max_tokens_limit)
        if problems:
            raise ParameterError("; ".join(message for _, message in problems))


class TextAssembler:
    """Turns one request's tokens into text deltas that are safe to send.

    A delta is held back while the text ends in an incomplete UTF-8 sequence or in a prefix of
    a stop sequence, so the joined deltas always equal the final text and a stop sequence is
    never half-sent. Each token decodes only a short window of the latest tokens (the last one
    already turned into text, and what came after it), never the whole sequence again: the cost
    per token stays flat however long the answer gets. Decoding the window with a token of
    context in front keeps tokenizers that drop a leading space right.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        # token_ids[context:decoded] were turned into text already; token_ids[decoded:] not yet.
        self.context = 0
        self.decoded = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that may be sent now (possibly empty)."""
        self.token_ids.append(token_id)
        known = self._decode(self.token_ids[self.context : self.decoded])
        window = self._decode(self.token_ids[self.context :])
        if window.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the token that completes it
        self.text += window[len(known) :]
        self.context, self.decoded = self.decoded, len(self.token_ids)
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_suffix())

    def flush(self) -> str:
        """The rest of the text, at the end of generation (an incomplete character included)."""
        if self.decoded < len(self.token_ids):
            known = self._decode(self.token_ids[self.context : self.decoded])
            self.text += self._decode(self.token_ids[self.context :])[len(known) :]
            self.context = self.decoded = len(self.token_ids)
        return self._emit(len(self.text))

    def _held_suffix(self) -> int:
        longest = 0
        for s in self.stop:
            for size in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:size]):
                    longest = size
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta


class TokenBytes:
    """Each token's exact UTF-8 bytes, and a token's log-probability entry as the API returns it.

    A byte-level BPE token (Qwen2.5-VL's, Pixtral's) is a string of byte-standing characters: its
    decoder's table, inverted, gives the bytes exactly, also for a token that holds only part of a
    multi-byte character (its text alone then has U+FFFD). An added or special token is its text.
    A tokenizer of any other kind: the token decoded alone (exact for tokens of whole characters).
    Built on first use (no cost for requests that never ask), looked up once per token and kept.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.known: dict[int, bytes] = {}

    @functools.cached_property
    def added(self) -> dict[int, str]:
        return {token_id: token.content for token_id, token in getattr(self.tokenizer, "added_tokens_decoder", {}).items()}

    @functools.cached_property
    def byte_of(self) -> dict[str, int] | None:
        return _byte_level_table(self.tokenizer)

    def __call__(self, token_id: int) -> bytes:
        known = self.known.get(token_id)
        if known is None:
            known = self.known[token_id] = self._bytes(token_id)
        return known

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        if self.byte_of is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            return bytes(self.byte_of[character] for character in piece)
        return self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")

    def entry(self, token_id: int, logprob: float) -> dict:
        """{"token", "bytes", "logprob"}: the token's text alone, its bytes, its log-probability."""
        data = self(token_id)
        return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data), "logprob": logprob}


def _byte_level_table(tokenizer) -> dict[str, int] | None:
    """character -> byte, where the tokenizer's decoder is (or holds) a byte-level one; else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    if not any(part.get("type") == "ByteLevel" for part in decoder.get("decoders", [decoder])):
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {character: byte for byte, character in bytes_to_unicode().items()}
