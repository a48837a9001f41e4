"""In-flight batching: requests join and leave the running batch at every generation step.

One `InflightEngine` per generation instance owns the running batch. Each `step()`:
1. ends cancelled rows (waiting or running) and frees their cache at once;
2. admits waiting requests while the batch has room: at most `max_running` rows, and a
   key/value-cache budget in tokens that the admitted rows can never exceed however long they run
   (a request whose response format is still compiling waits, and the ones behind it go first);
3. prefills the admitted requests together, at most `prefill_chunk_tokens` tokens per step, so a
   long prompt with images never stalls the running rows for more than one chunk;
4. runs one decode step for every running row and streams each row's new text (the constrained
   rows' masks are filled on another thread while the forward runs: `grammar.MaskFiller`);
5. retires finished, stopped and failed rows, freeing their cache.

Admission reserves each row's prompt + max_tokens, so no row is preempted for cache room. A request that
leaves max_tokens unset reserves what the context (or the cache budget, where smaller) leaves after
its prompt, at most max_tokens_limit: the longest answer it may take. Measured on the CPU profile
with the tiny checkpoints (context = max_tokens_limit = 4,096): 8 and 16 concurrent such requests
are all admitted at once, as with max_tokens 64 (16 is max_running; 16 x 4,096 is the 65,536-token
budget). On the GPU profile with real checkpoints (contexts of 128k and 1M tokens, limit 4,096) a
default row reserves prompt + 4,096 tokens of the 262,144: 62 rows for 100-token prompts, 31 for
Pixtral prompts with a 1024x1024 image (4,200 tokens; 61 with max_tokens 64). Where default requests
need more rows, the gateway caps them (VLM_DEFAULT_MAX_TOKENS) or cache_tokens grows; reserving less
than the whole answer needs preemption, which a paged cache brings.

Key/value cache: a dense, left-padded `DynamicCache` over the running rows (what Hugging Face's
text-generation-inference did with transformers models). A prefilled group is merged in by
left-padding the shorter of the two caches to the longer and concatenating rows; retired rows are
filtered out and the columns that only padding still holds are trimmed. docs/performance.md says why this
and not a slot or paged cache (measured by `perf/engine.py`).

Positions are per row: each row keeps its next position, so Qwen2.5-VL's multimodal rotary
positions (images take fewer positions than tokens) follow every row exactly; image embeddings
enter at prefill only. Each row keeps its own parameters, seed, stop sequences, penalties and
cancellation; greedy rows give exactly plain `generate`'s tokens. Log-probabilities (logprobs and
their alternatives) are the model's own: the log-softmax of the logits before any penalty,
top-k/top-p cut or grammar mask; rows that do not ask for them cost nothing more. The confidence
(the mean log-probability of the chosen tokens, which model `auto` routes by) is taken over the
distribution a row chose from: the model's own, renormalised over the tokens its response format
allows, so a token the format forces (a JSON key, the one allowed string) counts as certain and
only the model's real choices count as doubt; free-text rows are unchanged by this.

One request never fails another:
- everything a request holds is checked at submission (`BatchGenerator.check_request`: token ids
  in the vocabulary, image rows of the model's width, Qwen2.5-VL's grid against its image tokens,
  lengths), and its positions are computed there, on the CPU: a malformed request is refused
  before anything reaches the device, where an out-of-range index is a device-side assert;
- every row is always in exactly one of the waiting queue, the prefill group and the running
  batch until it has had its one final response (an update that ends it, or an error);
- each row's prompt embeddings are built in their own try (a fault fails that row); a prefill
  forward that fails cannot be pinned on one row, so its rows, none answered yet, go back to the
  front of the queue to be prefilled one at a time, and only a row that fails alone fails;
- out of memory: a prefill group is retried one row at a time as above; a decode step drops its
  newest row (failed with an error saying so) and the others go on; merging a group into the
  batch fails that group's rows (the newest) and leaves the batch whole.
A decode forward that fails for any other reason fails the running rows (the step is shared);
an error escaping a step (a bug) ends what the engine holds (`EngineLoop`).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from vlm_serving.generation.batch import (
    FINISH_CANCELLED, BatchGenerator, GenerationRequest, RequestUpdate, RowProgress, choose_tokens,
    penalize_occurrences, penalize_repetitions, top_alternatives,
)
from vlm_serving.generation.grammar import FormatCompiler, MaskFiller, RowGrammar, TokenMasks
from vlm_serving.generation.sampling import ParameterError
from vlm_serving.generation.scheduling import EngineLimits
from vlm_serving.generation.structured import ResponseFormat
from vlm_serving.tools import CALL_WRAPPERS


class EngineFull(RuntimeError):
    """The waiting queue is full: the request is refused now (retry later), never queued without bound."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory for this row; the rows beside it went on."""


@dataclass
class RequestSink:
    """Where one request's answer goes; the engine calls these from its own thread."""

    send_update: Callable[[RequestUpdate], None]
    send_error: Callable[[Exception], None]
    is_cancelled: Callable[[], bool] = lambda: False


@dataclass
class EngineStats:
    """What the engine has done so far (read by metrics and tests)."""

    running: int = 0
    waiting: int = 0
    prefilling: int = 0
    # Token slots of the dense cache (rows x columns), and those holding a real token (not padding).
    cache_tokens_used: int = 0
    cache_tokens_real: int = 0
    peak_cache_tokens: int = 0
    # Seconds spent merging rows into the cache and filtering them out (the dense cache's price).
    cache_seconds: float = 0.0
    steps: int = 0
    step_seconds: float = 0.0
    # Seconds the steps waited, after their forward, for the constrained rows' masks (the grammar's
    # cost on the critical path; the fill itself overlaps the forward).
    mask_wait_seconds: float = 0.0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    finished: int = 0


@dataclass(eq=False)  # a row is itself: the queue removes rows by identity
class _Row:
    request: GenerationRequest
    sink: RequestSink
    progress: RowProgress
    generator: torch.Generator
    # The prompt's and generated tokens, for the repetition penalty (as plain `generate` sees them).
    seen: list[int]
    # Prompt + max_tokens: the most cache columns this row can ever hold.
    reserve: int
    # The prompt's positions, on the CPU: [3, tokens] (Qwen2.5-VL's temporal, height, width) or [tokens].
    positions: torch.Tensor
    # The row's response format, where it has one (constrained decoding; admitted once compiled).
    grammar: RowGrammar | None = None
    # Where the row's last chosen token (fed at the next decode step) sits.
    next_position: int = 0
    last_token: int = 0
    # Prefilled in a group of its own: its group's prefill failed, and alone it fails by itself.
    alone: bool = False
    ended: bool = False


@dataclass
class _PrefillGroup:
    """Rows prefilled together: each one's prompt embeddings, their left-padded mask and positions,
    and their own cache so far."""

    rows: list[_Row]
    embeds: list[torch.Tensor]  # per row [prompt tokens, hidden]
    mask: torch.Tensor  # [rows, columns], 0 on the left padding
    positions: torch.Tensor  # [3, rows, columns] (Qwen2.5-VL) or [rows, columns]
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0  # columns prefilled so far

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    def embeds_between(self, start: int, end: int) -> torch.Tensor:
        """Columns start:end of the rows' left-padded embeddings, [rows, end - start, hidden]: only
        a chunk is ever padded (the whole group padded would be [rows, longest, hidden])."""
        pieces = []
        for embeds in self.embeds:
            pad = self.columns - len(embeds)
            piece = embeds[max(start - pad, 0) : max(end - pad, 0)]
            pieces.append(torch.nn.functional.pad(piece, (0, 0, end - start - len(piece), 0)))
        return torch.stack(pieces)


class InflightEngine:
    """The running batch of one model instance; drive it with `step()` or a `EngineLoop` thread."""

    def __init__(self, generator: BatchGenerator, limits: EngineLimits = EngineLimits()):
        self.generator = generator
        self.model = generator.model
        self.limits = limits
        self.device = generator.device
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        self._formats: FormatCompiler | None = None
        self._masks: MaskFiller | None = None
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._prefill: _PrefillGroup | None = None
        self._running: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [running rows, columns]
        self._waiting_checked = 0.0
        self.on_step: Callable[[EngineStats], None] = lambda stats: None
        self.wakeup = threading.Event()

    # ----- admission (any thread) -----

    def submit(self, request: GenerationRequest, sink: RequestSink) -> None:
        """Queue a request. Raises ValueError naming what is wrong with it (ParameterError for a
        parameter, or a request that can never fit), EngineFull if the queue is full."""
        self.generator.check_request(request)
        # An unset max_tokens: up to the context or this instance's whole cache budget, whichever is less.
        request = self.generator.resolve(request, context=min(self.generator.max_context, self.limits.cache_tokens))
        reserve = len(request.input_ids) + request.params.max_tokens
        if reserve > self.limits.cache_tokens:
            raise ParameterError(
                f"prompt of {len(request.input_ids)} tokens + max_tokens {request.params.max_tokens} exceeds this "
                f"model's key/value-cache budget of {self.limits.cache_tokens} tokens per instance; shorten the "
                "prompt or lower max_tokens"
            )
        # Checked now (a bad format never takes a row) and compiled on the compiler's thread: the
        # row waits in the queue until its grammar is ready, and wakes the loop when it is.
        grammar = self.formats.row(request.params.response_format) if request.params.response_format.constrained else None
        seed = request.params.seed
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else random.getrandbits(63))
        progress = RowProgress(request, self.generator.tokenizer, self.generator.eos_ids, self.generator.token_bytes)
        positions = self._prompt_positions(request)
        row = _Row(request, sink, progress, generator, request.input_ids.tolist(), reserve, positions, grammar,
                   next_position=int(positions.max()) + 1)
        with self._lock:
            if len(self._waiting) >= self.limits.max_waiting:
                raise EngineFull(
                    f"Exceeds maximum queue size: {self.limits.max_waiting} requests already wait for this model's "
                    "generation rows"
                )
            self._waiting.append(row)
            self.stats.waiting = len(self._waiting)
        if grammar is not None and not grammar.ready:
            grammar.when_ready(self.wakeup.set)
        self.wakeup.set()

    @property
    def formats(self) -> FormatCompiler:
        """The tokenizer's grammar compiler, made at the first request with a response format."""
        if self._formats is None:
            self._formats = FormatCompiler.for_tokenizer(self.generator.tokenizer, self.vocab_size, self.generator.eos_ids,
                                                         CALL_WRAPPERS.get(self.generator.family, ("", "")))
        return self._formats

    @formats.setter
    def formats(self, compiler: FormatCompiler) -> None:
        self._formats = compiler

    def prepare_formats(self, formats: list[ResponseFormat]) -> None:
        """Start compiling formats requests are known to ask for (the tasks' schemas), so that their
        first requests find them compiled."""
        for response_format in formats:
            self.formats.compile_later(response_format)

    @property
    def masks(self) -> MaskFiller:
        """What fills the constrained rows' masks, made at the first such row."""
        if self._masks is None:
            self._masks = MaskFiller(self.vocab_size)
        return self._masks

    @masks.setter
    def masks(self, filler: MaskFiller) -> None:
        self._masks = filler

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._prefill or self._running)

    # ----- one iteration (the engine's thread only) -----

    def step(self) -> bool:
        """One iteration of the loop; False when there was nothing to do (the waiting requests, if
        any, wait for their grammars: each wakes the loop when it is compiled)."""
        if self.idle:
            return False
        started = time.perf_counter()
        with torch.inference_mode():
            self._end_cancelled()
            self._admit()
            worked = self._prefill is not None or bool(self._running)
            if self._prefill is not None:
                self._prefill_chunk()
            if self._running:
                self._decode()
        self._account(time.perf_counter() - started if worked else 0.0)
        return worked

    WAITING_CHECK_INTERVAL_S = 0.1

    def _end_cancelled(self) -> None:
        """End the rows whose callers went away: running and prefilling ones at every step, waiting
        ones at most every WAITING_CHECK_INTERVAL_S (a long queue would otherwise cost a check per
        request per step)."""
        now = time.monotonic()
        if now - self._waiting_checked >= self.WAITING_CHECK_INTERVAL_S:
            self._waiting_checked = now
            with self._lock:
                gone = [row for row in self._waiting if row.sink.is_cancelled()]
                for row in gone:
                    self._waiting.remove(row)
            for row in gone:
                self._finish(row, row.progress.end(FINISH_CANCELLED))
        if self._prefill is not None:
            for row in self._prefill.rows:
                if not row.ended and row.sink.is_cancelled():
                    self._finish(row, row.progress.end(FINISH_CANCELLED))
            if all(row.ended for row in self._prefill.rows):
                self._prefill = None
        cancelled = [row for row in self._running if row.sink.is_cancelled()]
        for row in cancelled:
            self._finish(row, row.progress.end(FINISH_CANCELLED))
        if cancelled:
            self._retire()

    def _admit(self) -> None:
        """Move waiting rows, in order, into a new prefill group while the batch and the cache budget
        allow. A row whose grammar is still compiling keeps its place and the rows behind it go first."""
        if self._prefill is not None:
            return
        admitted: list[_Row] = []
        gone: list[_Row] = []
        refused: list[tuple[_Row, Exception]] = []
        with self._lock:
            for candidate in list(self._waiting):
                if candidate.sink.is_cancelled():
                    self._waiting.remove(candidate)
                    gone.append(candidate)
                    continue
                if candidate.grammar is not None:
                    if not candidate.grammar.ready:
                        continue
                    try:
                        candidate.grammar.matcher
                    except Exception as exc:  # the format could not be compiled
                        self._waiting.remove(candidate)
                        refused.append((candidate, exc))
                        continue
                if candidate.alone and admitted:
                    break
                rows = self._running + admitted + [candidate]
                if len(rows) > self.limits.max_running:
                    break
                # The dense cache holds every row at the longest row's length: this bound holds for
                # the rows' whole lives (each row's length stays within its reserve).
                if len(rows) * max(row.reserve for row in rows) > self.limits.cache_tokens:
                    break
                self._waiting.remove(candidate)
                admitted.append(candidate)
                if candidate.alone:
                    break
            self.stats.waiting = len(self._waiting)
        for row in gone:
            self._finish(row, row.progress.end(FINISH_CANCELLED))
        for row, exc in refused:
            self._fail([row], exc)
        if admitted:
            self._prefill = self._prefill_group(admitted)

    def _prefill_group(self, rows: list[_Row]) -> _PrefillGroup | None:
        """The rows' group, with each row's prompt embeddings built in its own try: a row whose
        embeddings fail ends with its error, the others go on. Out of memory fails no row here
        (`_prefill_failed`). None when no row is left."""
        built: list[tuple[_Row, torch.Tensor]] = []
        try:
            for row in rows:
                try:
                    built.append((row, self._prompt_embeds(row.request)))
                except Exception as exc:
                    if _out_of_memory(exc):
                        raise
                    self._fail([row], exc)
            if not built:
                return None
            longest = max(len(embeds) for _, embeds in built)
            masks = [torch.nn.functional.pad(torch.ones(len(embeds), dtype=torch.long), (longest - len(embeds), 0))
                     for _, embeds in built]
            positions = [torch.nn.functional.pad(row.positions, (longest - len(embeds), 0), value=1)
                         for row, embeds in built]
            return _PrefillGroup([row for row, _ in built], [embeds for _, embeds in built],
                                 torch.stack(masks).to(self.device), torch.stack(positions, dim=-2).to(self.device))
        except Exception as exc:
            self._prefill_failed([row for row in rows if not row.ended], exc)
            return None

    def _prompt_embeds(self, request: GenerationRequest) -> torch.Tensor:
        """[prompt tokens, hidden]: the tokens' embeddings with the image tokens' rows replaced by the
        encoder's (`check_request` made sure both fit)."""
        ids = torch.from_numpy(request.input_ids).to(self.device)
        embeds = self.model.get_input_embeddings()(ids)
        if request.image_embeds is not None and len(request.image_embeds):
            image_rows = torch.from_numpy(request.image_embeds).to(embeds)
            embeds = embeds.masked_scatter((ids == self.generator.image_token_id)[:, None], image_rows)
        return embeds

    def _prompt_positions(self, request: GenerationRequest) -> torch.Tensor:
        """[3, tokens] (Qwen2.5-VL's temporal, height, width) or [tokens] positions of a checked
        prompt, computed on the CPU at submission (a fault here is the submitter's error)."""
        ids = torch.from_numpy(request.input_ids)
        arange = torch.arange(len(ids))
        if not self.generator.marks_modalities:
            return arange
        grid = request.language_tensors.get("image_grid_thw")
        if grid is None or not len(grid):
            return arange.expand(3, -1)
        image_tokens = (ids == self.generator.image_token_id).to(torch.int32)
        positions, _ = self.model.model.get_rope_index(
            ids[None], mm_token_type_ids=image_tokens[None], image_grid_thw=torch.from_numpy(grid),
            attention_mask=torch.ones_like(ids)[None],
        )
        return positions[:, 0]

    def _prefill_chunk(self) -> None:
        group = self._prefill
        width = max(1, self.limits.prefill_chunk_tokens // len(group.rows))
        end = min(group.columns, group.done + width)
        # The last chunk chooses each row's first token: its masks are filled while it runs.
        masks = self._start_masks(group.rows) if end == group.columns else None
        try:
            out = self.model(
                inputs_embeds=group.embeds_between(group.done, end),
                attention_mask=group.mask[:, :end],
                position_ids=group.positions[..., group.done : end],
                cache=group.cache, use_cache=True, logits_to_keep=1,
            )
        except Exception as exc:
            self._prefill = None
            self._prefill_failed([row for row in group.rows if not row.ended], exc)
            return
        self.stats.prefill_tokens += int(group.mask[:, group.done : end].sum())
        group.done = end
        if end < group.columns:
            return
        # The group stays the engine's until its rows are in the running batch: whatever fails
        # before that (a bug escaping the step included) still answers them.
        self._advance(group.rows, out.logits[:, -1], masks)
        started = time.perf_counter()
        try:
            self._join(group)
        except Exception as exc:  # out of memory merging: the group's rows are the newest
            self._fail(group.rows, _explain(exc, f"merging {len(group.rows)} new row(s) into the running batch"))
        self._prefill = None
        self.stats.cache_seconds += time.perf_counter() - started

    def _prefill_failed(self, rows: list[_Row], exc: Exception) -> None:
        """A prefill that failed before any of its rows was answered. Alone, the row fails. In a
        group, the fault (or the memory) cannot be pinned on one row: the rows go back to the front
        of the queue, in order, to be prefilled one at a time, so only a row that fails alone fails."""
        if len(rows) == 1:
            prompt = len(rows[0].request.input_ids)
            self._fail(rows, _explain(exc, f"prefilling a prompt of {prompt} tokens beside {len(self._running)} "
                                           "running row(s)"))
            return
        for row in rows:
            row.alone = True
        with self._lock:
            self._waiting.extendleft(reversed(rows))
            self.stats.waiting = len(self._waiting)

    def _join(self, group: _PrefillGroup) -> None:
        """Merge a prefilled group's cache into the running batch (rows that already ended left out).
        The batch changes only once every layer is merged: a failure midway leaves it whole."""
        keep = [i for i, row in enumerate(group.rows) if not row.ended]
        if not keep:
            return
        cache, mask = group.cache, group.mask
        if len(keep) < len(group.rows):
            cache, mask = _select(cache, mask, keep)
        rows = [group.rows[i] for i in keep]
        if not self._running:
            self._cache, self._mask, self._running = cache, mask, rows
            self._trim()
            return
        columns = max(self._mask.shape[1], mask.shape[1])
        merged = [(torch.cat([_pad_left(ours.keys, columns), _pad_left(theirs.keys, columns)]),
                   torch.cat([_pad_left(ours.values, columns), _pad_left(theirs.values, columns)]))
                  for ours, theirs in zip(self._cache.layers, cache.layers)]
        mask = torch.cat([_pad_left(self._mask, columns), _pad_left(mask, columns)])
        for layer, (keys, values) in zip(self._cache.layers, merged):
            layer.keys, layer.values = keys, values
        self._mask = mask
        self._running += rows

    def _decode(self) -> None:
        rows = self._running
        last = torch.tensor([[row.last_token] for row in rows], device=self.device)
        position = torch.tensor([[row.next_position] for row in rows], device=self.device)
        if self.generator.marks_modalities:
            position = position.expand(3, -1, -1)
        columns = self._mask.shape[1]
        self._mask = torch.nn.functional.pad(self._mask, (0, 1), value=1)
        masks = self._start_masks(rows)
        try:
            out = self.model(input_ids=last, attention_mask=self._mask, position_ids=position,
                             cache=self._cache, use_cache=True)
        except Exception as exc:
            self._decode_failed(exc, columns)
            return
        self.stats.decode_tokens += len(rows)
        for row in rows:
            row.next_position += 1
        self._advance(rows, out.logits[:, -1], masks)
        started = time.perf_counter()
        self._retire()
        self.stats.cache_seconds += time.perf_counter() - started

    def _decode_failed(self, exc: Exception, columns: int) -> None:
        """A decode step failed. Out of memory: the step is undone, the newest row fails and the
        others go on at the next step. Anything else cannot be pinned on a row: the running rows fail."""
        rows = self._running
        live = [row for row in rows if not row.ended]
        if not (_out_of_memory(exc) and len(live) > 1):
            self._running, self._cache, self._mask = [], None, None
            self._fail(rows, _explain(exc, f"decoding {len(live)} row(s)"))
            return
        # The layers the forward reached hold the step's column already.
        self._mask = self._mask[:, :columns]
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :columns], layer.values[:, :, :columns]
        self._fail(live[-1:], _explain(exc, f"decoding {len(live)} rows; this one, the newest, was ended so that the "
                                            "others go on"))
        self._retire()

    def _start_masks(self, rows: list[_Row]) -> "Future[TokenMasks] | None":
        """Start filling the rows' masks for the token the coming forward chooses (None: no
        constrained row). Its grammars stand where that token needs them: they only move in `_advance`,
        which waits for the fill first."""
        grammars = [None if row.ended else row.grammar for row in rows]
        return self.masks.start(grammars) if any(grammars) else None

    def _advance(self, rows: list[_Row], logits: torch.Tensor, filling: "Future[TokenMasks] | None") -> None:
        """Choose each row's next token from its logits (and its mask, being filled since before the
        forward); stream it; end the rows that are done."""
        scores = logits.float()
        # The model's own distribution: what logprobs and their alternatives report.
        logprobs = torch.log_softmax(scores, dim=-1)
        params = [row.request.params for row in rows]
        alternatives = top_alternatives(logprobs, params)
        masks = None
        if filling is not None:
            waited = time.perf_counter()
            masks = filling.result()
            self.stats.mask_wait_seconds += time.perf_counter() - waited
        # What the confidence averages: the distribution each row chose from, renormalised over
        # what its format allows (a forced token is certain), before penalties and temperature.
        allowed = logprobs if masks is None else masks.renormalised(logprobs)
        penalize_repetitions(scores, [row.seen for row in rows], params)
        penalize_occurrences(scores, [row.progress.answer_ids for row in rows], params)
        if masks is not None:
            masks.apply(scores)
        chosen = choose_tokens(scores, params, [row.generator for row in rows])
        tokens = chosen.tolist()
        model_logprobs = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        allowed_logprobs = model_logprobs if masks is None else allowed.gather(1, chosen[:, None])[:, 0].tolist()
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if row.ended:  # cancelled while its group was prefilled
                continue
            try:  # a fault in one row's own bookkeeping (its grammar, its text) ends that row alone
                if row.grammar is not None:
                    row.grammar.accept(token)
                row.seen.append(token)
                row.last_token = token
                # Cancellation is read once per step, before the forward (`_end_cancelled`): in
                # Triton each read crosses to the server process.
                update = row.progress.advance(token, model_logprobs[i], _never,
                                              alternatives[i] if alternatives else (), allowed_logprobs[i])
            except Exception as exc:
                self._fail([row], exc)
                continue
            if update is None:
                continue
            if update.finished:
                self._finish(row, update)
            else:
                self._send(row, update)

    def _retire(self) -> None:
        keep = [i for i, row in enumerate(self._running) if not row.ended]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        try:
            self._cache, self._mask = _select(self._cache, self._mask, keep)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            return  # the ended rows stay in the batch, skipped, until a later step has the memory to drop them
        self._running = [self._running[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Drop the leading columns that only padding holds (the longest row left)."""
        used = int(self._mask.any(dim=0).nonzero()[0])
        if used:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, used:]
                layer.values = layer.values[:, :, used:]
            self._mask = self._mask[:, used:]

    # ----- answers -----

    def _send(self, row: _Row, update: RequestUpdate) -> None:
        try:
            row.sink.send_update(update)
        except Exception as exc:  # this caller cannot be reached: end its row, not the batch
            self._fail([row], exc)

    def _finish(self, row: _Row, update: RequestUpdate) -> None:
        if row.ended:
            return
        row.ended = True
        self.stats.finished += 1
        try:
            row.sink.send_update(update)
        except Exception as exc:
            row.ended = False
            self._fail([row], exc)

    def _fail(self, rows: list[_Row], exc: Exception) -> None:
        for row in rows:
            if row.ended:
                continue
            row.ended = True
            self.stats.finished += 1
            try:
                row.sink.send_error(exc)
            except Exception:
                pass  # nothing more can reach this caller

    def fail_all(self, exc: Exception) -> None:
        """End every request the engine holds with `exc` (the instance is going away)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        prefilling = self._prefill.rows if self._prefill else []
        self._fail(waiting + prefilling + self._running, exc)
        self._prefill, self._running, self._cache, self._mask = None, [], None, None
        self._account(0.0)

    def _account(self, seconds: float) -> None:
        stats = self.stats
        stats.steps += 1 if seconds else 0
        stats.step_seconds += seconds
        stats.running = len(self._running)
        stats.waiting = len(self._waiting)
        stats.prefilling = len(self._prefill.rows) if self._prefill else 0
        used = real = 0
        if self._mask is not None:
            used, real = self._mask.numel(), int(self._mask.sum())
        if self._prefill is not None:
            used += len(self._prefill.rows) * self._prefill.done
            real += int(self._prefill.mask[:, : self._prefill.done].sum())
        stats.cache_tokens_used, stats.cache_tokens_real = used, real
        stats.peak_cache_tokens = max(stats.peak_cache_tokens, used)
        self.on_step(stats)


def _never() -> bool:
    return False


def _out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error (CUDA and the others), or an allocator's RuntimeError saying so."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(words in str(exc) for words in ("out of memory", "not enough memory")))


def _explain(exc: Exception, doing: str) -> Exception:
    """What the row's caller gets: out of memory said as such, with what the engine was doing;
    any other error as it is."""
    if _out_of_memory(exc):
        return OutOfMemory(f"out of memory {doing}; retry later ({_first_line(exc)})")
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Left-pad the column dimension (-2 of a cache [rows, heads, columns, dim], -1 of a mask) with zeros."""
    dim = -1 if tensor.dim() == 2 else -2
    missing = columns - tensor.shape[dim]
    if not missing:
        return tensor
    return torch.nn.functional.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0))


def _select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """The `keep` rows of a cache and its mask; the cache changes only once every layer is selected."""
    index = torch.tensor(keep, device=mask.device)
    selected = [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers]
    mask = mask.index_select(0, index)
    for layer, (keys, values) in zip(cache.layers, selected):
        layer.keys, layer.values = keys, values
    return cache, mask


class EngineLoop:
    """Runs an engine's steps on a thread of its own until `stop()`."""

    def __init__(self, engine: InflightEngine, log_error: Callable[[str], None] = lambda message: None):
        self.engine = engine
        self.log_error = log_error
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            # Cleared before the step: a request submitted after this point wakes the wait below.
            engine.wakeup.clear()
            try:
                worked = engine.step()
            except Exception as exc:  # a bug in the loop itself: end what it holds, keep serving
                self.log_error(f"generation step failed: {exc!r}")
                engine.fail_all(exc)
                worked = True
            if not worked:
                engine.wakeup.wait(timeout=1.0)

    def stop(self, grace_s: float, reason: Exception) -> None:
        """Let held requests finish for up to `grace_s`, then end the rest with `reason`."""
        deadline = time.monotonic() + grace_s
        while not self.engine.idle and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        self._stopping = True
        self.engine.wakeup.set()
        self._thread.join(timeout=30)
        self.engine.fail_all(reason)
