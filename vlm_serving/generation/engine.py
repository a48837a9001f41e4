"""In-flight batching: requests join and leave the running batch at every generation step.

One `InflightEngine` per generation instance owns the running batch. Each `step()`:
1. ends cancelled rows (waiting, prefilling or running) and frees their cache blocks at once;
2. admits waiting requests while the batch has room: at most `max_running` rows, and the blocks
   of the key/value cache each needs now (its prompt, and a block of room per row held to grow
   into; a request whose response format is still compiling waits, and the ones behind it go first);
3. runs ONE forward that packs, unpadded, every running row's decode token and a chunk of each
   prefilling row's prompt (at most `prefill_chunk_tokens` prompt tokens per step, shared evenly,
   so a long prompt with images never stalls the running rows or the short prompts beside it for
   more than one chunk), and streams each row's new text (the constrained rows' masks are filled
   on another thread while the forward runs: `grammar.MaskFiller`);
4. retires finished, stopped and failed rows, freeing their blocks.

Admission counts the blocks a row needs now, not what it may need: rows grow a block at a time
as they decode. When a step needs blocks that are not free, the newest rows are preempted: their
blocks freed, they go back to the front of the queue and are prefilled again later from their
prompt and the tokens they had chosen, then go on where they stopped (greedy tokens stay exact).
One row alone always fits: `submit` refuses a prompt + max_tokens beyond the budget. A request
that leaves max_tokens unset may take what the context (or the cache budget, where smaller)
leaves after its prompt, at most max_tokens_limit.

Key/value cache: a paged cache written in place (`paged_cache.PagedKV`, blocks of `block_tokens`
slots in per-layer pools allocated once, a block table per row in `kv_blocks.BlockTables`) read
by an attention function of our own registered with transformers (`paged_rows`): a step copies
no cached key or value, rows join and leave without moving anyone's, and no row reads another's.
Prefix caching: a prompt's full blocks are kept under keys chaining their token ids and their
images' and clips' content (`kv_blocks.prefix_keys`); a new row (or a preempted one coming back)
starts with the longest prefix kept (an earlier turn of its chat, the same document image or clip)
and prefills only the rest (requests about one image that arrive together: the later ones wait for
the first one's prefill of it, the rows behind them going first); kept blocks no row holds are
evicted least recently used first. The final update says how many prompt tokens came from the cache
(`RequestUpdate.cached_tokens`).

Positions are per row: each row keeps its next position, so Qwen2.5-VL's multimodal rotary
positions (images and clips take fewer positions than tokens; a clip's temporal positions follow
its seconds per temporal patch) follow every row exactly; image and clip embeddings enter at
prefill only. Each row keeps its own parameters, seed, stop sequences, penalties and cancellation;
greedy rows give exactly plain `generate`'s tokens. Log-probabilities (logprobs and their
alternatives) are the model's own: the log-softmax of the logits before any penalty, top-k/top-p
cut or grammar mask; rows that do not ask for them cost nothing more. The confidence (the mean
log-probability of the chosen tokens, which model `auto` routes by) is taken over the distribution
a row chose from: the model's own, renormalised over the tokens its response format allows, so a
token the format forces (a JSON key, the one allowed string) counts as certain and only the model's
real choices count as doubt; free-text rows are unchanged by this.

One request never fails another:
- everything a request holds is checked at submission (`BatchGenerator.check_request`: token ids
  in the vocabulary, image and clip rows of the model's width, Qwen2.5-VL's grids against its image
  and video tokens and each clip's seconds per temporal patch,
  lengths), and its positions are computed there, on the CPU: a malformed request is refused
  before anything reaches the device, where an out-of-range index is a device-side assert;
- every row is always in exactly one of the waiting queue, the prefill group and the running
  batch until it has had its one final response (an update that ends it, or an error);
- each row's prompt embeddings are built in their own try (a fault fails that row); a forward
  that fails cannot be pinned on one row (see below), and only a row that fails alone fails;
- a forward that fails while it prefills several prompts: those rows (none answered yet) go back
  to the front of the queue to be prefilled one at a time, and the running rows decode again at
  the next step (what the failed forward wrote is overwritten: a row's length moves only after
  its forward succeeded);
- out of memory beside other rows: the newest row is preempted (as when blocks run out) and,
  until a row finishes, the batch holds at most the rows that fitted; out of memory with one
  row alone fails that row with an error saying so.
A forward that fails for any other reason with no prompt to blame fails the running rows (the step is shared);
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

from vlm_serving.generation.batch import (
    FINISH_CANCELLED, IMAGE, TEXT, VIDEO, BatchGenerator, GenerationRequest, RequestUpdate, RowProgress, choose_tokens,
    penalize_occurrences, penalize_repetitions, top_alternatives,
)
from vlm_serving.generation.kv_blocks import OutOfBlocks, media_digests, prefix_keys
from vlm_serving.generation.grammar import FormatCompiler, MaskFiller, RowGrammar, TokenMasks
from vlm_serving.generation.paged_cache import PREPARED_MASK, PagedKV, PagedStep, use_paged_attention
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
    # The row left the waiting queue for the batch (again after a preemption): tracing's queue wait ends.
    on_admitted: Callable[[], None] = lambda: None
    # `submit` refused the request (the caller answers it): tracing's queue wait ends with the refusal.
    on_refused: Callable[[Exception], None] = lambda exc: None


@dataclass
class EngineStats:
    """What the engine has done so far (read by metrics and tests)."""

    running: int = 0
    waiting: int = 0
    prefilling: int = 0
    # Token slots of the blocks the rows hold, and those holding a token (the rest of each row's last block).
    cache_tokens_used: int = 0
    cache_tokens_real: int = 0
    peak_cache_tokens: int = 0
    # Seconds spent planning the cache's slots for the steps' forwards (the paged cache's bookkeeping).
    cache_seconds: float = 0.0
    steps: int = 0
    step_seconds: float = 0.0
    # Seconds the steps waited, after their forward, for the constrained rows' masks (the grammar's
    # cost on the critical path; the fill itself overlaps the forward).
    mask_wait_seconds: float = 0.0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    finished: int = 0
    # Rows preempted (their blocks freed, recomputed later) for cache room or device memory.
    preempted: int = 0
    # Prefix caching: tokens found in the cache instead of prefilled (a preempted row's recompute
    # included), and the full blocks kept for reuse.
    cached_tokens: int = 0
    cached_blocks: int = 0


@dataclass(eq=False)  # a row is itself: the queue removes rows by identity
class _Row:
    request: GenerationRequest
    sink: RequestSink
    progress: RowProgress
    generator: torch.Generator
    # The prompt's and generated tokens, for the repetition penalty (as plain `generate` sees them).
    seen: list[int]
    # The prompt's positions, on the CPU: [3, tokens] (Qwen2.5-VL's temporal, height, width) or [tokens].
    positions: torch.Tensor
    # The row's response format, where it has one (constrained decoding; admitted once compiled).
    grammar: RowGrammar | None = None
    # Where the row's last chosen token (fed at the next decode step) sits.
    next_position: int = 0
    last_token: int = 0
    # Positions of the row in the cache (prompt tokens prefilled so far, then each decoded token's).
    cached: int = 0
    # While the row is prefilled: [tokens, hidden] embeddings of its prompt (a preempted row's:
    # prompt + the tokens it had chosen) and their positions.
    embeds: torch.Tensor | None = None
    prefill_positions: torch.Tensor | None = None
    # The order rows were admitted in (the newest is preempted first).
    admitted: int = 0
    # (start, end, content digest) of each image and clip in the prompt: its blocks' prefix keys hold them.
    media: list = field(default_factory=list)
    # The prefix keys of the full blocks of what the row prefills.
    block_keys: list = field(default_factory=list)
    # Prompt tokens found in the prefix cache when the row was first prefilled (reported in its usage).
    cached_prompt_tokens: int | None = None
    # Prefilled with no other prompt beside it: a forward that held it among others failed, and
    # alone it fails by itself.
    alone: bool = False
    ended: bool = False


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
        # Admitted rows whose prompts are being prefilled, and rows decoding, in the order they came.
        self._prefilling: list[_Row] = []
        self._running: list[_Row] = []
        use_paged_attention(self.model)
        self._cache = PagedKV(self.model, -(-limits.cache_tokens // limits.block_tokens), limits.block_tokens)
        self.blocks = self._cache.tables
        self._admissions = 0
        # After an out-of-memory error: the most rows held until one of them finishes (None: max_running).
        self._row_cap: int | None = None
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
        # One row alone always fits: preemption frees every other row's blocks for it.
        if len(request.input_ids) + request.params.max_tokens > self.limits.cache_tokens:
            raise ParameterError(
                f"prompt of {len(request.input_ids)} tokens + max_tokens {request.params.max_tokens} exceeds this "
                f"model's key/value-cache budget of {self.limits.cache_tokens} tokens per instance; shorten the "
                "prompt or lower max_tokens"
            )
        # Checked now (a bad format never takes a row) and compiled on the compiler's thread: the
        # row waits in the queue until its grammar is ready, and wakes the loop when it is.
        grammar = (self.formats.row(request.params.response_format, request.continuation)
                   if request.params.response_format.constrained else None)
        seed = request.params.seed
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else random.getrandbits(63))
        progress = RowProgress(request, self.generator.tokenizer, self.generator.eos_ids, self.generator.token_bytes)
        # A continued request (stream migration) stands where its delivered tokens left it, as a
        # preempted row does: they are prefilled after the prompt, count in its answer (penalties,
        # max_tokens, usage), and a sampling row's generator makes the draws it made for them
        # (`choose_tokens` draws one number per token), so a seeded sample goes on as it would have.
        progress.resume(request.continuation)
        if request.params.temperature > 0.0:
            for _ in request.continuation:
                torch.rand(1, generator=generator)
        positions = self._prompt_positions(request)
        # Hashed here, on the caller's thread: an image's or clip's rows are read once per request.
        media = media_digests(self.generator.media_runs(request), request.image_embeds)
        row = _Row(request, sink, progress, generator, request.input_ids.tolist() + list(request.continuation),
                   positions, grammar, next_position=int(positions.max()) + 1, media=media)
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
        return not (self._waiting or self._prefilling or self._running)

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
            worked = bool(self._prefilling or self._running)
            if worked:
                self._forward()
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
        cancelled = [row for row in self._prefilling + self._running if row.sink.is_cancelled()]
        for row in cancelled:
            self._finish(row, row.progress.end(FINISH_CANCELLED))
        if cancelled:
            self._retire()

    def _admit(self) -> None:
        """Move waiting rows, in order, to the prefilling rows while the batch and the cache budget
        allow. A row whose grammar is still compiling keeps its place and the rows behind it go first;
        a row to be prefilled alone waits for the prompts before it and takes none beside it."""
        if any(row.alone for row in self._prefilling):
            return
        admitted: list[_Row] = []
        gone: list[_Row] = []
        refused: list[tuple[_Row, Exception]] = []
        held = self._prefilling + self._running
        row_limit = min(self.limits.max_running, self._row_cap or self.limits.max_running)
        free = self.blocks.free
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
                if candidate.alone and (admitted or self._prefilling):
                    break
                if self._prefix_in_progress(candidate, self._prefilling + admitted):
                    continue  # it starts from those blocks once they are kept; the rows behind it go first
                if len(held) + len(admitted) + 1 > row_limit:
                    break
                # The blocks its tokens need now, and one block of room for each row held to grow
                # into (a row admitted into a full cache would only be preempted at the next step).
                needed = self.blocks.needed(len(candidate.seen) + 1)
                if needed + len(held) + len(admitted) > free:
                    break
                free -= needed
                self._waiting.remove(candidate)
                admitted.append(candidate)
                if candidate.alone:
                    break
            self.stats.waiting = len(self._waiting)
        for row in gone:
            self._finish(row, row.progress.end(FINISH_CANCELLED))
        for row, exc in refused:
            self._fail([row], exc)
        for row in admitted:
            self._admissions += 1
            row.admitted = self._admissions
        if admitted:
            self._start_prefill(admitted)

    def _start_prefill(self, rows: list[_Row]) -> None:
        """Build each admitted row's prompt embeddings in its own try: a row whose embeddings fail
        ends with its error, the others go on. Out of memory fails no row here (`_prefill_failed`)."""
        try:
            for row in rows:
                try:
                    row.embeds, row.prefill_positions = self._prefill_inputs(row)
                except Exception as exc:
                    if _out_of_memory(exc):
                        raise
                    self._fail([row], exc)
                    continue
                self._reuse_prefix(row)
                self._prefilling.append(row)
                row.sink.on_admitted()
        except Exception as exc:
            self._prefilling = [row for row in self._prefilling if row not in rows]
            self._prefill_failed([row for row in rows if not row.ended], exc)

    def _prefix_keys(self, row: _Row) -> list[bytes]:
        """The prefix keys of the full blocks of what the row prefills (computed once per length)."""
        block = self.blocks.block_tokens
        if len(row.block_keys) != len(row.seen) // block:
            row.block_keys = prefix_keys(row.seen, block, row.media)
        return row.block_keys

    def _prefix_in_progress(self, candidate: _Row, prefilling: list[_Row]) -> bool:
        """Whether an image or clip of the candidate's prompt, past the blocks the cache keeps, is
        being prefilled by another row now (questions about one document, submitted together): admitted
        after that row, the candidate reuses its blocks instead of computing them again
        beside it. Shared text alone (a system prompt) is cheap and never holds a row back."""
        if not (self.limits.prefix_caching and candidate.media):
            return False
        block = self.blocks.block_tokens
        usable = self._prefix_keys(candidate)[: (len(candidate.seen) - 1) // block]
        kept = self.blocks.kept_prefix(usable)
        for row in prefilling:
            theirs = set(self._prefix_keys(row))
            shared = kept
            while shared < len(usable) and usable[shared] in theirs:
                shared += 1
            if any(start < shared * block and kept * block < end for start, end, _ in candidate.media):
                return True
        return False

    def _reuse_prefix(self, row: _Row) -> None:
        """Start the row with the longest prefix of what it prefills that the cache keeps; at least
        its last token is prefilled (its logits choose the next token). Without prefix caching the
        row has no keys, so it keeps no block either."""
        if not self.limits.prefix_caching:
            row.cached_prompt_tokens = 0
            return
        block = self.blocks.block_tokens
        matched = self.blocks.match(row, self._prefix_keys(row)[: (len(row.seen) - 1) // block])
        row.cached = matched * block
        self.stats.cached_tokens += row.cached
        if row.cached_prompt_tokens is None:
            row.cached_prompt_tokens = min(row.cached, len(row.request.input_ids))

    def _prefill_inputs(self, row: _Row) -> tuple[torch.Tensor, torch.Tensor]:
        """What the row prefills: its prompt's embeddings and positions, followed, for a preempted
        row, by the tokens it had chosen (the last one included: the prefill's logits choose the next)."""
        embeds, positions = self._prompt_embeds(row.request), row.positions
        chosen = row.seen[len(row.request.input_ids):]
        if chosen:
            embeds = torch.cat([embeds, self.model.get_input_embeddings()(torch.tensor(chosen, device=self.device))])
            after = torch.arange(len(chosen)) + int(positions.max()) + 1
            positions = torch.cat([positions, after.expand(3, -1) if positions.dim() == 2 else after], dim=-1)
        return embeds, positions

    def _prompt_embeds(self, request: GenerationRequest) -> torch.Tensor:
        """[prompt tokens, hidden]: the tokens' embeddings with the image and video tokens' rows
        replaced by the encoder's (`check_request` made sure both fit)."""
        ids = torch.from_numpy(request.input_ids).to(self.device)
        embeds = self.model.get_input_embeddings()(ids)
        if request.image_embeds is not None and len(request.image_embeds):
            media_rows = torch.from_numpy(request.image_embeds).to(embeds)
            media_tokens = torch.from_numpy(self.generator.token_types(request.input_ids) != TEXT).to(self.device)
            embeds = embeds.masked_scatter(media_tokens[:, None], media_rows)
        return embeds

    def _prompt_positions(self, request: GenerationRequest) -> torch.Tensor:
        """[3, tokens] (Qwen2.5-VL's temporal, height, width) or [tokens] positions of a checked
        prompt, computed on the CPU at submission (a fault here is the submitter's error): transformers'
        own `get_rope_index`, given what `generate` gives it (the processor's modality ids, the grids,
        the clips' seconds per temporal patch)."""
        ids = torch.from_numpy(request.input_ids)
        arange = torch.arange(len(ids))
        if not self.generator.marks_modalities:
            return arange
        token_types = torch.from_numpy(self.generator.token_types(request.input_ids))
        kinds = set(token_types.unique().tolist())
        if kinds == {TEXT}:
            return arange.expand(3, -1)
        names = (["image_grid_thw"] if IMAGE in kinds else []) + (
            ["video_grid_thw", "second_per_grid_ts"] if VIDEO in kinds else [])
        tensors = {name: torch.from_numpy(request.language_tensors[name]) for name in names}
        positions, _ = self.model.model.get_rope_index(
            ids[None], mm_token_type_ids=token_types[None], attention_mask=torch.ones_like(ids)[None], **tensors)
        return positions[:, 0]

    def _chunks(self) -> list[tuple[_Row, int, int]]:
        """(row, start, end) of the prompt tokens each prefilling row feeds this step: the budget is
        shared evenly, and what a short prompt leaves goes to the longer ones."""
        remaining = {row: len(row.embeds) - row.cached for row in self._prefilling if not row.ended}
        shares = dict.fromkeys(remaining, 0)
        budget = self.limits.prefill_chunk_tokens
        while budget and any(shares[row] < remaining[row] for row in shares):
            open_rows = [row for row in shares if shares[row] < remaining[row]]
            share = max(1, budget // len(open_rows))
            for row in open_rows:
                take = min(share, remaining[row] - shares[row], budget)
                shares[row] += take
                budget -= take
                if not budget:
                    break
        return [(row, row.cached, row.cached + take) for row, take in shares.items() if take]

    def _forward(self) -> None:
        """One forward over every running row's next token and the prompts' chunks; then each row
        that got logits (the decoding rows, and the prompts whose last chunk ran) chooses its token."""
        started = time.perf_counter()
        decoding, chunks = self._make_room()
        if not (decoding or chunks):
            return
        step = self._cache.plan([(row, row.cached) for row in decoding], chunks)
        self.stats.cache_seconds += time.perf_counter() - started
        completing = [row for row, _, end in chunks if end == len(row.embeds)]
        # The rows that choose a token: their masks are filled while the forward runs.
        choosing = decoding + completing
        masks = self._start_masks(choosing)
        try:
            logits = self._run(step, decoding, chunks)
        except Exception as exc:
            if masks is not None:
                masks.result()  # the fill reads the grammars that the next step's fill reads again
            self._forward_failed(exc, decoding, [row for row, _, _ in chunks])
            return
        self.stats.decode_tokens += len(decoding)
        for row in decoding:
            row.cached += 1
            row.next_position += 1
        for row, start, end in chunks:
            row.cached = end
            self.stats.prefill_tokens += end - start
            self.blocks.keep(row, row.block_keys[: end // self.blocks.block_tokens])
        for row in completing:
            row.next_position = int(row.prefill_positions.max()) + 1
            row.embeds = row.prefill_positions = None
            self._prefilling.remove(row)
            self._running.append(row)
        # The completed prompts are running rows before any of them is answered: whatever fails
        # from here (a bug escaping the step included) still answers them.
        if choosing:
            self._advance(choosing, logits, masks)
        self._retire()

    def _make_room(self) -> tuple[list[_Row], list[tuple[_Row, int, int]]]:
        """The step's decoding rows and prompt chunks, with the blocks they write into: while the
        cache lacks them, the newest row is preempted (one row alone always fits: `submit`)."""
        while True:
            decoding = [row for row in self._running if not row.ended]
            chunks = self._chunks()
            try:
                for row in decoding:
                    self.blocks.grow(row, row.cached + 1)
                for row, _, end in chunks:
                    self.blocks.grow(row, end)
                return decoding, chunks
            except OutOfBlocks:  # the newest row held, whether or not this step feeds it
                held = [row for row in self._prefilling + self._running if not row.ended]
                self._preempt(max(held, key=lambda row: row.admitted))

    def _preempt(self, row: _Row) -> None:
        """Free the row's blocks and put it back at the front of the queue: it is prefilled again
        later from its prompt and the tokens it had chosen, and goes on where it stopped."""
        (self._running if row in self._running else self._prefilling).remove(row)
        self.blocks.release(row)
        row.cached, row.embeds, row.prefill_positions = 0, None, None
        self.stats.preempted += 1
        with self._lock:
            self._waiting.appendleft(row)
            self.stats.waiting = len(self._waiting)

    def _run(self, step: PagedStep, decoding: list[_Row], chunks: list[tuple[_Row, int, int]]) -> torch.Tensor:
        """The packed forward: [rows that choose, vocab] logits (decoding rows, then completed prompts)."""
        embeds, positions, keep = [], [], []
        if decoding:
            last = torch.tensor([row.last_token for row in decoding], device=self.device)
            embeds.append(self.model.get_input_embeddings()(last))
            position = torch.tensor([row.next_position for row in decoding])
            positions.append(position.expand(3, -1) if self.generator.marks_modalities else position)
            keep.extend(range(len(decoding)))
        at = len(decoding)
        for row, start, end in chunks:
            embeds.append(row.embeds[start:end])
            positions.append(row.prefill_positions[..., start:end])
            at += end - start
            if end == len(row.embeds):
                keep.append(at - 1)
        position_ids = torch.cat(positions, dim=-1).to(self.device)
        position_ids = position_ids[:, None] if self.generator.marks_modalities else position_ids[None]
        out = self.model(inputs_embeds=torch.cat(embeds)[None], position_ids=position_ids, cache=self._cache,
                         use_cache=False, attention_mask=PREPARED_MASK, paged_step=step,
                         logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device))
        return out.logits[0]

    def _forward_failed(self, exc: Exception, decoding: list[_Row], prefilling: list[_Row]) -> None:
        """A forward failed; no row's length moved, so the running rows simply decode again at the
        next step. Prompts among others: they go back to be prefilled alone (none was answered).
        A prompt alone, or out of memory beside running rows: the newest row ends and the others go
        on. Anything else cannot be pinned on a row: the running rows fail."""
        prefilling = [row for row in prefilling if not row.ended]
        if len(prefilling) > 1 or (prefilling and not prefilling[0].alone):
            self._prefill_failed(prefilling, exc)
            return
        live = decoding + prefilling
        if _out_of_memory(exc) and len(live) > 1:
            # Until a row finishes, the batch holds at most the rows that fitted.
            self._row_cap = len(live) - 1
            self._preempt(max(live, key=lambda row: row.admitted))
        elif prefilling:
            self._fail(prefilling, _explain(exc, f"prefilling a prompt of {len(prefilling[0].request.input_ids)} "
                                                 f"tokens beside {len(decoding)} running row(s)"))
        else:
            self._fail(decoding, _explain(exc, f"decoding {len(decoding)} row(s)"))
        self._retire()

    def _prefill_failed(self, rows: list[_Row], exc: Exception) -> None:
        """A prefill that failed before any of its rows was answered. Alone, the row fails. Among
        others, the fault (or the memory) cannot be pinned on one row: the rows give back their
        blocks and go back to the front of the queue, in order, to be prefilled one at a time, so
        only a row that fails alone fails."""
        if len(rows) == 1 and rows[0].alone:
            prompt = len(rows[0].request.input_ids)
            self._fail(rows, _explain(exc, f"prefilling a prompt of {prompt} tokens beside {len(self._running)} "
                                           "running row(s)"))
            self._retire()
            return
        for row in rows:
            self._prefilling.remove(row) if row in self._prefilling else None
            self.blocks.release(row)
            row.alone, row.cached, row.embeds, row.prefill_positions = True, 0, None, None
        with self._lock:
            self._waiting.extendleft(reversed(rows))
            self.stats.waiting = len(self._waiting)

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
        """Drop the rows that ended (prefilling or running) and give back their blocks."""
        for rows in (self._prefilling, self._running):
            for row in [row for row in rows if row.ended]:
                rows.remove(row)
                self.blocks.release(row)
                row.embeds = row.prefill_positions = None
                self._row_cap = None

    # ----- answers -----

    def _send(self, row: _Row, update: RequestUpdate) -> None:
        try:
            row.sink.send_update(update)
        except Exception as exc:  # this caller cannot be reached: end its row, not the batch
            self._fail([row], exc)

    def _finish(self, row: _Row, update: RequestUpdate) -> None:
        if row.ended:
            return
        update.cached_tokens = row.cached_prompt_tokens or 0
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
        self._fail(waiting + self._prefilling + self._running, exc)
        for row in self._prefilling + self._running:
            self.blocks.release(row)
        self._prefilling, self._running = [], []
        self._account(0.0)

    def _account(self, seconds: float) -> None:
        stats = self.stats
        stats.steps += 1 if seconds else 0
        stats.step_seconds += seconds
        stats.running = len(self._running)
        stats.waiting = len(self._waiting)
        stats.prefilling = len(self._prefilling)
        used = self.blocks.used * self.blocks.block_tokens
        real = sum(row.cached for row in self._prefilling + self._running)
        stats.cache_tokens_used, stats.cache_tokens_real = used, real
        stats.cached_blocks = self.blocks.kept
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
