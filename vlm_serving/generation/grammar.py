"""Constrained decoding: a `ResponseFormat` compiled into per-token masks by xgrammar.

xgrammar was chosen by measurement (perf/RESULTS.md, "Constrained decoding"): on both tiny
tokenizers a typical schema compiled in 3-5 ms and a step's mask took 0.06-0.18 ms; llguidance
1.9.1 compiled faster (0.8 ms) but one sampled path cost 89 ms per step on the Qwen tokenizer.
xgrammar is also what vLLM, SGLang and TensorRT-LLM use.

At a real vocabulary (Qwen2.5-VL's 151k tokens) both costs grow by orders of magnitude
(perf/RESULTS.md, "Grammar at a real vocabulary"): a task schema compiles in seconds, and a
step's masks for a batch inside JSON strings take milliseconds per row. Neither runs on the
critical path:
- `FormatCompiler` compiles on a thread of its own (`compile_later`): Triton's execute thread
  and the engine's never wait for a compile; the row waits in the queue (`RowGrammar.ready`)
  while the others decode. Compiled formats are cached by the format's canonical form, bounded
  in bytes, and the same format asked for while it compiles is compiled once.
- `MaskFiller` fills a step's masks with xgrammar's batch matcher (its own threads, the GIL
  released) on a thread of its own, started before the step's forward and collected after it:
  the masks are filled while the forward runs.
`RowGrammar` follows one row's tokens; `TokenMasks` applies every constrained row's mask to the
batch's logits in one call, so rows with and without formats share a batch.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from vlm_serving.generation.sampling import ParameterError
from vlm_serving.generation.structured import CHOICE, JSON_OBJECT, JSON_SCHEMA, REGEX, TOOL_CALL, ResponseFormat

# Compiled grammars kept per tokenizer (xgrammar's cache, least recently used out first).
CACHE_BYTES = 64 * 1024 * 1024


class FormatCompiler:
    def __init__(self, info: xgr.TokenizerInfo, cache_bytes: int = CACHE_BYTES,
                 call_wrapper: tuple[str, str] = ("", "")):
        self.info = info
        # The family's function-call markers around a TOOL_CALL format's JSON (vlm_serving/tools.py).
        self.call_wrapper = call_wrapper
        # Our own cache, keyed by the format's canonical form: a hit skips the schema -> grammar
        # conversion too. Bounded by the compiled grammars' bytes, least recently used out first.
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.cache: collections.OrderedDict[str, xgr.CompiledGrammar] = collections.OrderedDict()
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self.lock = threading.Lock()  # Triton may call execute on several threads
        # Formats being compiled, by key: a second request for one waits for the same compile.
        self.compiling: dict[str, Future] = {}
        # One compile at a time (xgrammar parallelises each one itself), never on a caller's thread.
        self.compile_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_ids: set[int],
                      call_wrapper: tuple[str, str] = ("", "")) -> "FormatCompiler":
        """For a Hugging Face tokenizer; `vocab_size`: the model's logits (may exceed the tokenizer's)."""
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        return cls(info, call_wrapper=call_wrapper)

    def compile(self, response_format: ResponseFormat) -> xgr.CompiledGrammar:
        """The format's grammar, waiting for its compile (`compile_later`)."""
        return self.compile_later(response_format).result()

    def compile_later(self, response_format: ResponseFormat) -> "Future[xgr.CompiledGrammar]":
        """The format's grammar, compiled on the compiler's own thread (a finished future when cached).
        A format that breaks the rules raises ParameterError now; one the grammar engine cannot
        compile fails its future with ParameterError."""
        try:
            key = response_format.to_wire()
        except ValueError:  # not JSON: the checks below name it
            key = None
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return _finished(self.cache[key])
            if key in self.compiling:
                return self.compiling[key]
        problems = response_format.violations()  # checked once per format, not on every hit
        if problems:
            raise ParameterError("response_format: " + "; ".join(problems))
        with self.lock:
            if key is None:  # no canonical form to share or cache it by
                return self.compile_thread.submit(self._compile, response_format)
            if key not in self.compiling:
                self.compiling[key] = self.compile_thread.submit(self._compile_and_keep, key, response_format)
            return self.compiling[key]

    def _compile_and_keep(self, key: str, response_format: ResponseFormat) -> xgr.CompiledGrammar:
        try:
            compiled = self._compile(response_format)
        except BaseException:
            with self.lock:
                del self.compiling[key]
            raise
        with self.lock:  # cached and no longer compiling in one step: no one compiles it twice
            del self.compiling[key]
            self.cache[key] = compiled
            self.cached_bytes += compiled.memory_size_bytes
            while self.cached_bytes > self.cache_bytes and len(self.cache) > 1:
                _, evicted = self.cache.popitem(last=False)
                self.cached_bytes -= evicted.memory_size_bytes
        return compiled

    def _compile(self, response_format: ResponseFormat) -> xgr.CompiledGrammar:
        try:
            if response_format.type in (JSON_SCHEMA, JSON_OBJECT):
                schema = response_format.schema if response_format.type == JSON_SCHEMA else '{"type":"object"}'
                return self.compiler.compile_grammar(json_grammar(schema))
            if response_format.type == TOOL_CALL:
                prefix, suffix = self.call_wrapper
                call = re.sub(r"^root ::=", "call_json ::=", json_grammar(response_format.schema), flags=re.M)
                return self.compiler.compile_grammar(f"root ::= {json.dumps(prefix)} call_json {json.dumps(suffix)}\n{call}")
            if response_format.type == REGEX:
                return self.compiler.compile_regex(response_format.pattern)
            if response_format.type == CHOICE:
                alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in response_format.choices)
                return self.compiler.compile_grammar(f"root ::= {alternatives}")
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ParameterError(f"response_format {response_format.type}: not supported ({_first_line(exc)})") from None
        raise ParameterError(f"response_format type {response_format.type!r} cannot be compiled")

    def row(self, response_format: ResponseFormat, continuation: Sequence[int] = ()) -> "RowGrammar | None":
        """A grammar for one row (None for free text); usable once `ready`. `continuation`: the
        answer's tokens delivered already (stream migration), which the row's matcher accepts first."""
        if not response_format.constrained:
            return None
        return RowGrammar(self.compile_later(response_format), continuation)


class RowGrammar:
    """Where one row stands in its grammar, once its format is compiled."""

    def __init__(self, compiled: "Future[xgr.CompiledGrammar]", continuation: Sequence[int] = ()):
        self._compiled = compiled
        self._continuation = continuation
        self._matcher: xgr.GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        """The compile has ended (`matcher` then returns at once, or raises its error)."""
        return self._compiled.done()

    def when_ready(self, callback: Callable[[], None]) -> None:
        self._compiled.add_done_callback(lambda _: callback())

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        """The row's matcher (waits for the compile; raises its ParameterError if it failed), advanced
        over the row's continuation (ParameterError naming the first token the format refuses)."""
        if self._matcher is None:
            matcher = xgr.GrammarMatcher(self._compiled.result())
            for at, token in enumerate(self._continuation):
                if not matcher.accept_token(token):
                    raise ParameterError(f"CONTINUATION[{at}] = {token} does not follow the response_format after "
                                         "the tokens before it; send the token ids the answer's responses carried")
            self._matcher = matcher
        return self._matcher

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")


class TokenMasks:
    """The tokens each constrained row of a batch may take next (one xgrammar bitmask for the batch)."""

    def __init__(self, rows: list[int], bitmask: torch.Tensor, vocab_size: int):
        self.rows = rows
        self.bitmask = bitmask
        self.vocab_size = vocab_size

    def apply(self, scores: torch.Tensor) -> None:
        """Disallow, in place, every token each constrained row's grammar forbids next."""
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), vocab_size=self.vocab_size,
                                        indices=self.rows)

    def renormalised(self, logprobs: torch.Tensor) -> torch.Tensor:
        """`logprobs` with each constrained row's restricted to its allowed tokens and renormalised
        over them (a token the grammar forces gets 0); other rows as they are."""
        allowed = logprobs.clone()
        self.apply(allowed)
        allowed[self.rows] = torch.log_softmax(allowed[self.rows], dim=-1)
        return allowed


class MaskFiller:
    """Fills a batch's masks off the engine's thread: `start` before a forward, the future's result
    after it. xgrammar's batch matcher spreads the rows over its own threads and releases the GIL,
    so on a GPU the masks are ready when the logits are; on a CPU the fill and the forward share
    its cores."""

    def __init__(self, vocab_size: int, threads: int | None = None):
        self.vocab_size = vocab_size
        # Every core by default (xgrammar's own default is half): the engine's thread only waits
        # for the fill, and inside JSON strings at a real vocabulary a row's mask costs milliseconds.
        self.batch = xgr.BatchGrammarMatcher(threads or os.cpu_count() or 1)
        # One fill at a time, in order: a step's fill has ended before the next step's tokens are accepted.
        self.fill_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")

    def start(self, grammars: Sequence[RowGrammar | None]) -> "Future[TokenMasks] | None":
        """The masks of a batch whose rows have these grammars (None: free text, or ended); None
        when no row is constrained."""
        rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
        if not rows:
            return None
        matchers = [grammars[i].matcher for i in rows]
        return self.fill_thread.submit(self.fill, len(grammars), rows, matchers)

    def fill(self, batch_rows: int, rows: list[int], matchers: list[xgr.GrammarMatcher]) -> TokenMasks:
        bitmask = xgr.allocate_token_bitmask(batch_rows, self.vocab_size)
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        return TokenMasks(rows, bitmask, self.vocab_size)


def _finished(value) -> Future:
    done: Future = Future()
    done.set_result(value)
    return done


def json_grammar(schema: str) -> str:
    """The EBNF grammar of JSON documents valid under `schema`: compact (no free whitespace: a
    model's tokens go into content, not indentation), and with only valid characters in strings.

    Two gaps of xgrammar 0.2.8's string characters, found by the sampled tests and closed here:
    a length-bounded string's class lets U+0000-U+001F through (raw control characters are invalid
    JSON), and every string's class lets UTF-16 surrogates (U+D800-U+DFFF) through, which its
    UTF-8 reading accepts as bytes ED A0 80... but no UTF-8 decoder turns into a character.
    """
    grammar = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":")))
    for loose in _LOOSE_STRING_CHARACTERS:
        grammar = grammar.replace(loose, _JSON_STRING_CHARACTER)
    return grammar


_LOOSE_STRING_CHARACTERS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\\r\n\uD800-\uDFFF]"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
