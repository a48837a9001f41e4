"""Generate for a whole dynamic batch at once, each request with its own parameters.

One `transformers` `generate` call runs the batch (left padding, greedy argmax as the selection
rule). Two hooks make it per-request:
- `_PerRequestSampling` (a logits processor) applies each row's penalties and, for rows that
  sample, draws the token with the row's own seeded generator and leaves only it selectable;
  greedy rows pass through untouched, so greedy output is exactly plain `generate`'s.
- `_PerRequestProgress` (a stopping criterion, called once per step with the new tokens) assembles
  each row's text, applies its stop sequences, max_tokens and cancellation, and reports updates.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers import StoppingCriteriaList

from vlm_serving.generation.loading import context_tokens
from vlm_serving.generation.sampling import ParameterError, SamplingDefaults, SamplingParams, TextAssembler, TokenBytes

FINISH_STOP = "stop"  # end-of-sequence token or a stop sequence
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_CANCELLED = "cancelled"  # the caller went away


@dataclass
class GenerationRequest:
    """One request as the generator sees it: prompt ids, its images' embeddings, parameters."""

    input_ids: np.ndarray
    params: SamplingParams
    # float32 [image and video tokens, hidden]: the vision encoder's rows for the prompt's image and
    # video tokens, in prompt order (one run per image or clip).
    image_embeds: np.ndarray | None = None
    # What else the text model needs about the images and clips (Qwen2.5-VL's 3-D positions:
    # image_grid_thw, video_grid_thw and second_per_grid_ts; a request with no clip may leave out the last two).
    language_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    image_tokens: int = 0
    # The answer's first tokens, delivered to the caller already by another server that then
    # failed (stream migration, gateway/migration.py): the request goes on after them (`RowProgress.resume`).
    continuation: tuple[int, ...] = ()


@dataclass
class RequestUpdate:
    """Sent to the caller: a text delta (streaming) or the whole text (final, non-streaming)."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    # Prompt tokens found in the in-flight engine's prefix cache, not prefilled (OpenAI's
    # usage.prompt_tokens_details.cached_tokens); 0 from the static scheduler.
    cached_tokens: int = 0
    # Mean log-probability of the generated tokens (0 = certain; 0 before any token), each under the
    # distribution it was chosen from: the model's own, renormalised over the tokens the response
    # format allows (a token the format forces counts as certain). Penalties and temperature do not enter.
    confidence: float = 0.0
    # SamplingParams.logprobs: one entry per token of `token_ids` (`TokenBytes.entry` and its
    # "top_logprobs"); empty when not asked.
    logprobs: list[dict] = field(default_factory=list)


class RowProgress:
    """One request's answer so far: its text, log-probabilities and unsent tokens; decides when it ends.

    Shared by both schedulers (the static batch below and `engine.InflightEngine`). With
    `logprobs`, every token sent comes with its entry: the end-of-sequence token, which is not
    part of the text, is sent with neither; tokens a stop sequence cuts from the text keep theirs
    (they were generated, and counted in completion_tokens).
    """

    def __init__(self, request: GenerationRequest, tokenizer, eos_ids: set[int], token_bytes: TokenBytes):
        self.request = request
        self.text = TextAssembler(tokenizer, request.params.stop)
        self.eos_ids = eos_ids
        self.token_bytes = token_bytes
        # Each generated token's log-probability under the distribution it was chosen from (see
        # RequestUpdate.confidence); one per generated token, the end token included.
        self.chosen_logprobs: list[float] = []
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[dict] = []
        self.finish_reason = ""
        # Tokens of the answer delivered before this server took it over (`resume`).
        self.continued = 0

    @property
    def answer_ids(self) -> list[int]:
        """The tokens generated so far (the end-of-sequence token ends the row, so never among them)."""
        return self.text.token_ids

    def resume(self, tokens: tuple[int, ...]) -> None:
        """Take the answer's first tokens, delivered already by another server: their text counts as
        sent (the assembler, fed the same tokens, holds back exactly what that server held back), so
        the next delta starts where the caller's text ends; they count in completion_tokens and
        max_tokens, not in the confidence (their log-probabilities are not known here). Raises
        ParameterError when they already end the answer."""
        for token in tokens:
            self.text.add(token)
        self.continued = len(tokens)
        if self.text.stopped:
            raise ParameterError("CONTINUATION holds a stop sequence: the answer ended there; there is nothing "
                                 "to continue")
        if self.request.params.max_tokens is not None and self.continued >= self.request.params.max_tokens:
            raise ParameterError(f"CONTINUATION holds {self.continued} tokens, max_tokens "
                                 f"{self.request.params.max_tokens} leaves none to generate")

    def advance(self, token: int, logprob: float, is_cancelled: Callable[[], bool],
                alternatives: list[tuple[int, float]] = (), chosen_logprob: float | None = None) -> RequestUpdate | None:
        """Take the row's next token, its log-probability under the model, (top_logprobs) the most
        likely tokens at its position and (a constrained row) its log-probability among the tokens
        the format allowed: the final update if the row ends here, a text delta to stream, or
        None (nothing to send yet)."""
        params = self.request.params
        self.chosen_logprobs.append(logprob if chosen_logprob is None else chosen_logprob)
        delta = ""
        if token in self.eos_ids:
            self.finish_reason = FINISH_STOP
        else:
            self.pending_ids.append(token)
            if params.logprobs:
                entry = self.token_bytes.entry(token, logprob)
                entry["top_logprobs"] = [self.token_bytes.entry(other, value) for other, value in alternatives]
                self.pending_logprobs.append(entry)
            delta = self.text.add(token)
            if self.text.stopped:
                self.finish_reason = FINISH_STOP
            elif self.continued + len(self.chosen_logprobs) >= params.max_tokens:
                self.finish_reason = FINISH_LENGTH
            elif is_cancelled():
                self.finish_reason = FINISH_CANCELLED
        if self.finish_reason:
            return self.final(delta)
        if params.stream and delta:
            update = RequestUpdate(text=delta, token_ids=self.pending_ids, logprobs=self.pending_logprobs)
            self.pending_ids, self.pending_logprobs = [], []
            return update
        return None

    def end(self, reason: str) -> RequestUpdate:
        """End the row now (cancelled, or out of length) with its final update."""
        self.finish_reason = reason
        return self.final("")

    def final(self, unsent: str) -> RequestUpdate:
        """The final update: the last delta (streaming) or the whole text. `unsent` is text
        already released by the assembler but not yet sent."""
        stream = self.request.params.stream
        last_delta = unsent + self.text.flush()
        return RequestUpdate(
            text=last_delta if stream else self.text.text,
            token_ids=self.pending_ids if stream else self.text.token_ids,
            finished=True,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.request.input_ids),
            completion_tokens=self.continued + len(self.chosen_logprobs),
            image_tokens=self.request.image_tokens,
            confidence=float(np.mean(self.chosen_logprobs)) if self.chosen_logprobs else 0.0,
            # Streaming: those since the last update; else every one (none was sent before).
            logprobs=self.pending_logprobs,
        )


UpdateSink = Callable[[int, RequestUpdate], None]


def penalize_repetitions(scores: torch.Tensor, seen: list, params: list[SamplingParams]) -> None:
    """Each row's repetition penalty on the tokens it has seen (prompt and answer), in place, as
    transformers' `RepetitionPenaltyLogitsProcessor` does."""
    for i, row_params in enumerate(params):
        if row_params.repetition_penalty == 1.0:
            continue
        tokens = torch.as_tensor(seen[i], device=scores.device)
        picked = scores[i].gather(0, tokens)
        picked = torch.where(picked < 0, picked * row_params.repetition_penalty, picked / row_params.repetition_penalty)
        scores[i].scatter_(0, tokens, picked)


def penalize_occurrences(scores: torch.Tensor, answers: list, params: list[SamplingParams]) -> None:
    """Each row's presence and frequency penalties, in place, as OpenAI documents them: a token's
    logit less presence_penalty if it occurs in the row's answer so far, and less
    frequency_penalty times the number of times it occurs there."""
    for i, row_params in enumerate(params):
        presence, frequency = row_params.presence_penalty or 0.0, row_params.frequency_penalty or 0.0
        if not (presence or frequency) or not len(answers[i]):
            continue
        tokens, counts = torch.unique(torch.as_tensor(answers[i], device=scores.device), return_counts=True)
        scores[i, tokens] -= presence + frequency * counts.to(scores.dtype)


def top_alternatives(logprobs: torch.Tensor, params: list[SamplingParams]) -> list[list[tuple[int, float]]] | None:
    """Each row's top_logprobs most likely tokens, (id, log-probability), most likely first: one
    `topk` over the rows that ask; None when no row does."""
    asking = [i for i, row_params in enumerate(params) if row_params.top_logprobs]
    if not asking:
        return None
    values, ids = logprobs[asking].topk(max(params[i].top_logprobs for i in asking), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    alternatives: list[list[tuple[int, float]]] = [[] for _ in params]
    for row, i in enumerate(asking):
        count = params[i].top_logprobs
        alternatives[i] = list(zip(ids[row][:count], values[row][:count]))
    return alternatives


def choose_tokens(scores: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """Each row's next token: the argmax for greedy rows; for rows that sample, a draw with the
    row's own seeded generator after its temperature, top-k and top-p, vectorised over those rows."""
    tokens = scores.argmax(dim=-1)
    sampling = [i for i, row in enumerate(params) if row.temperature > 0.0]
    if not sampling:
        return tokens
    device = scores.device
    index = torch.tensor(sampling, device=device)
    vocab = scores.shape[-1]
    temperature = torch.tensor([params[i].temperature for i in sampling], device=device)[:, None]
    logits, order = torch.sort(scores.index_select(0, index).float() / temperature, dim=-1, descending=True)
    top_k = torch.tensor([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in sampling], device=device)
    logits = logits.masked_fill(torch.arange(vocab, device=device)[None, :] >= top_k[:, None], float("-inf"))
    top_p = torch.tensor([params[i].top_p for i in sampling], device=device)[:, None]
    probs = torch.softmax(logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    drop = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1.0)
    cdf = torch.softmax(logits.masked_fill(drop, float("-inf")), dim=-1).cumsum(-1)
    draws = torch.cat([torch.rand(1, generator=generators[i]) for i in sampling]).to(device)
    picked = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None]).clamp(max=vocab - 1)
    tokens[index] = order.gather(1, picked).squeeze(1)
    return tokens


class _PerRequestSampling(LogitsProcessor):
    """Applies each row's penalties and, for rows that sample, leaves only the drawn token selectable."""

    def __init__(self, rows: list[RowProgress], pad_lengths: list[int]):
        self.params = [row.request.params for row in rows]
        self.pad_lengths = pad_lengths
        # The generated tokens start after the (left-padded) prompts.
        self.prompt_columns = max(len(row.request.input_ids) + pad for row, pad in zip(rows, pad_lengths))
        self.generators = []
        for params in self.params:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
            self.generators.append(generator)
        self.last_logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last_logprobs = torch.log_softmax(scores.float(), dim=-1)
        penalize_repetitions(scores, [input_ids[i, pad:] for i, pad in enumerate(self.pad_lengths)], self.params)
        penalize_occurrences(scores, input_ids[:, self.prompt_columns :], self.params)
        sampling = [i for i, params in enumerate(self.params) if params.temperature > 0.0]
        if sampling:
            tokens = choose_tokens(scores, self.params, self.generators)
            for i in sampling:
                token = int(tokens[i])
                scores[i].fill_(float("-inf"))
                scores[i, token] = 0.0
        return scores


class _PerRequestProgress(StoppingCriteria):
    def __init__(self, rows: list[RowProgress], sampling: _PerRequestSampling, on_update: UpdateSink,
                 is_cancelled: Callable[[int], bool]):
        self.rows = rows
        self.sampling = sampling
        self.on_update = on_update
        self.is_cancelled = is_cancelled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1].tolist()
        logprobs = self.sampling.last_logprobs
        alternatives = top_alternatives(logprobs, self.sampling.params)
        done = []
        for i, (row, token) in enumerate(zip(self.rows, new_tokens)):
            if not row.finish_reason:
                update = row.advance(token, float(logprobs[i, token]), lambda index=i: self.is_cancelled(index),
                                     alternatives[i] if alternatives else ())
                if update is not None:
                    self.on_update(i, update)
            done.append(bool(row.finish_reason))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def run_batch(
    generator: "BatchGenerator",
    requests: list[GenerationRequest],
    send_update: UpdateSink,
    send_error: Callable[[int, Exception], None],
    is_cancelled: Callable[[int], bool] = lambda index: False,
    log_error: Callable[[str], None] = lambda message: None,
) -> None:
    """Generate for a batch; every request ends with exactly one final response, whatever fails.

    A row whose update cannot be built or sent ends with an error instead and stops generating;
    if the whole batch fails, every row not yet ended gets the error. A send that fails while
    ending a row is logged, and the other rows are still ended.
    """
    ended: set[int] = set()

    def end_with_error(index: int, exc: Exception) -> None:
        ended.add(index)
        try:
            send_error(index, exc)
        except Exception as send_failure:  # nothing more can reach this caller
            log_error(f"request {index}: could not send its final error ({send_failure!r})")

    def on_update(index: int, update: RequestUpdate) -> None:
        if index in ended:
            return
        try:
            send_update(index, update)
        except Exception as exc:
            log_error(f"request {index}: could not send an update ({exc!r})")
            end_with_error(index, exc)
            return
        if update.finished:
            ended.add(index)

    try:
        generator.generate(requests, on_update, lambda index: index in ended or is_cancelled(index))
    except Exception as exc:
        log_error(f"generation failed: {exc!r}")
        for index in range(len(requests)):
            if index not in ended:
                end_with_error(index, exc)


def _describe_array(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} of shape {list(value.shape)}"
    return type(value).__name__


# A prompt token's modality, as Qwen2.5-VL's processor marks it (`mm_token_type_ids`).
TEXT, IMAGE, VIDEO = 0, 1, 2
# Per modality: the language tensor of its runs' grids, and what its runs are called in errors.
_GRIDS = {IMAGE: ("image_grid_thw", "image"), VIDEO: ("video_grid_thw", "video")}


@dataclass(frozen=True)
class MediaRun:
    """One image's or one clip's run of placeholder tokens in a prompt, and what its positions follow
    (Qwen2.5-VL; Pixtral has no grid): its grid (t, h, w) and, for a clip, its seconds per temporal patch."""

    start: int
    end: int
    kind: int  # IMAGE or VIDEO
    grid: tuple[int, ...] = ()
    seconds_per_patch: float | None = None


def _runs(token_types: np.ndarray, kind: int) -> list[tuple[int, int]]:
    """(start, end) of each run of tokens of one modality."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (token_types == kind).astype(np.int8), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


class BatchGenerator:
    """Runs batches of `GenerationRequest`s through one loaded model."""

    def __init__(self, family: str, model, tokenizer, device: torch.device | str = "cpu",
                 max_tokens_limit: int | None = None):
        self.family = family
        self.model = model
        self.tokenizer = tokenizer
        self.token_bytes = TokenBytes(tokenizer)
        self.device = torch.device(device)
        # The most tokens one answer may take (None: only the context bounds it).
        self.max_tokens_limit = max_tokens_limit
        config = model.generation_config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids))
        self.max_context = context_tokens(model.config)
        self.image_token_id = int(model.config.image_token_id)
        # Qwen2.5-VL's clips; Pixtral has no video token (a video reaches it as frames, images).
        video_token_id = getattr(model.config, "video_token_id", None)
        self.video_token_id = None if video_token_id is None else int(video_token_id)
        embeddings = model.get_input_embeddings()
        self.vocab_size, self.hidden_size = embeddings.num_embeddings, embeddings.embedding_dim
        # Qwen2.5-VL builds its 3-D (multimodal rotary) positions only when given the processor's
        # per-token modality ids (`token_types`); Llava/Pixtral takes none.
        self.marks_modalities = family == "qwen2_5_vl"
        # Qwen2.5-VL: an image's tokens are its grid's patches merged merge_size x merge_size.
        self.merge_size = model.config.vision_config.spatial_merge_size if self.marks_modalities else 1
        # What requests get for the sampling fields they leave unset (the checkpoint's defaults).
        self.defaults = SamplingDefaults.from_generation_config(config.to_dict())

    def resolve(self, request: GenerationRequest, context: int | None = None) -> GenerationRequest:
        """The request with every parameter it leaves unset filled: the sampling ones from the
        checkpoint's defaults; max_tokens with what `context` (default the model's) leaves after
        the prompt, at most max_tokens_limit. Raises ParameterError when the prompt leaves none."""
        context = self.max_context if context is None else context
        room = context - len(request.input_ids)
        if self.max_tokens_limit is not None:
            room = min(room, self.max_tokens_limit)
        if request.params.max_tokens is None and room < 1:
            raise ParameterError(
                f"the prompt's {len(request.input_ids)} tokens leave no room for an answer within {context} tokens "
                "(the model's context, or this instance's key/value-cache budget where smaller); shorten the prompt"
            )
        return replace(request, params=request.params.resolve(self.defaults, room))

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse what this model cannot run, with a ValueError naming the input and the fix
        (ParameterError for a parameter): called where a request is submitted, before anything
        reaches the device (there an out-of-range embedding index is a device-side assert that can
        take the whole instance down), so a malformed request fails alone."""
        ids = request.input_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"INPUT_IDS must be one row of integer token ids, got {_describe_array(ids)}")
        if not len(ids):
            raise ValueError("INPUT_IDS is empty; a prompt needs at least one token")
        outside = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if len(outside):
            at = int(outside[0])
            raise ValueError(f"INPUT_IDS[{at}] = {int(ids[at])} is outside this model's vocabulary (ids 0 to "
                             f"{self.vocab_size - 1}); tokenize with the model's own tokenizer")
        request.params.validate(self.max_tokens_limit or self.max_context)
        self._check_continuation(request)
        max_tokens = request.params.max_tokens
        if max_tokens is None and len(ids) >= self.max_context:
            raise ParameterError(f"prompt of {len(ids)} tokens leaves no room for an answer in the model's context of "
                                 f"{self.max_context} tokens; shorten the prompt")
        if max_tokens is not None and len(ids) + max_tokens > self.max_context:
            raise ParameterError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the model's context "
                                 f"of {self.max_context} tokens; shorten the prompt or lower max_tokens")
        token_types = self.token_types(ids)
        self._check_image_embeds(request, token_types)
        if self.marks_modalities:
            for kind in (IMAGE, VIDEO):
                self._check_grid(token_types, kind, request.language_tensors.get(_GRIDS[kind][0]))
            self._check_seconds_per_patch(token_types, request.language_tensors.get("second_per_grid_ts"))

    def _check_continuation(self, request: GenerationRequest) -> None:
        """A continuation (the answer's tokens another server delivered) must be tokens of this
        model's vocabulary that do not end the answer, of a streamed request (a whole answer has
        nothing delivered to continue)."""
        if not request.continuation:
            return
        if not request.params.stream:
            raise ParameterError("CONTINUATION continues a streamed answer: set STREAM true")
        for at, token in enumerate(request.continuation):
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"CONTINUATION[{at}] = {token} is outside this model's vocabulary (ids 0 to "
                                 f"{self.vocab_size - 1}); send the token ids the answer's responses carried")
            if token in self.eos_ids:
                raise ParameterError(f"CONTINUATION[{at}] = {token} is the end-of-sequence token: the answer "
                                     "ended there; there is nothing to continue")

    def token_types(self, ids: np.ndarray) -> np.ndarray:
        """Each prompt token's modality (TEXT, IMAGE or VIDEO): Qwen2.5-VL's `mm_token_type_ids`."""
        types = np.where(ids == self.image_token_id, IMAGE, TEXT).astype(np.int32)
        if self.video_token_id is not None:
            types[ids == self.video_token_id] = VIDEO
        return types

    def media_runs(self, request: GenerationRequest) -> list[MediaRun]:
        """Each image's and clip's run of tokens in a checked prompt, in prompt order, with its grid
        and (a clip) its seconds per temporal patch where the model takes them (Qwen2.5-VL)."""
        token_types = self.token_types(request.input_ids)
        tensors = request.language_tensors
        runs = []
        for kind in (IMAGE, VIDEO):
            grids = tensors.get(_GRIDS[kind][0]) if self.marks_modalities else None
            seconds = tensors.get("second_per_grid_ts") if self.marks_modalities and kind == VIDEO else None
            for index, (start, end) in enumerate(_runs(token_types, kind)):
                runs.append(MediaRun(start, end, kind, () if grids is None else tuple(grids[index].tolist()),
                                     None if seconds is None else float(seconds[index])))
        return sorted(runs, key=lambda run: run.start)

    def _check_image_embeds(self, request: GenerationRequest, token_types: np.ndarray) -> None:
        """Every image and video token of the prompt needs one embedding row of the model's width, and nothing more."""
        images, videos = int((token_types == IMAGE).sum()), int((token_types == VIDEO).sum())
        embeds = request.image_embeds
        if embeds is not None and (not isinstance(embeds, np.ndarray) or embeds.ndim != 2 or embeds.dtype.kind != "f"):
            raise ValueError(f"IMAGE_EMBEDS must be [image and video tokens, {self.hidden_size}] floats, got "
                             f"{_describe_array(embeds)}")
        rows = 0 if embeds is None else len(embeds)
        if images + videos != rows:
            tokens = f"{images} image token(s)" + (f" and {videos} video token(s)" if videos else "")
            raise ValueError(f"the prompt holds {tokens} but {rows} embedding row(s) came with it (IMAGE_EMBEDS: one "
                             "row per image and video token, in prompt order)")
        if rows and embeds.shape[1] != self.hidden_size:
            raise ValueError(f"IMAGE_EMBEDS rows are {embeds.shape[1]} wide; this model's embeddings are "
                             f"{self.hidden_size} wide (the rows must come from this model's own vision encoder)")

    def _check_grid(self, token_types: np.ndarray, kind: int, grid) -> None:
        """Qwen2.5-VL: one IMAGE_GRID_THW row per image (a run of image tokens), one VIDEO_GRID_THW
        row per clip (a run of video tokens), in prompt order, whose merged patches are exactly that
        run's tokens: its 3-D positions are built from them."""
        tensor, noun = _GRIDS[kind]
        name = tensor.upper()
        runs = [end - start for start, end in _runs(token_types, kind)]
        grid = np.zeros((0, 3), np.int64) if grid is None else grid
        if not isinstance(grid, np.ndarray) or grid.ndim != 2 or grid.shape[1] != 3 or grid.dtype.kind not in "iu":
            raise ValueError(f"{name} must be [{noun}s, 3] integers, got {_describe_array(grid)}")
        if len(grid) != len(runs):
            raise ValueError(f"{name} describes {len(grid)} {noun}(s) but the prompt holds {len(runs)} run(s) of "
                             f"{noun} tokens; send the preprocessing step's grid with its prompt")
        merge = self.merge_size
        for index, ((t, h, w), tokens) in enumerate(zip(grid.tolist(), runs)):
            if t < 1 or h < merge or w < merge or h % merge or w % merge:
                raise ValueError(f"{name}[{index}] = {[t, h, w]} is not a grid of patches (temporal at least 1, "
                                 f"height and width positive multiples of {merge})")
            if t * h * w // merge**2 != tokens:
                raise ValueError(f"{name}[{index}] = {[t, h, w]} makes {t * h * w // merge**2} {noun} tokens but "
                                 f"{noun} {index} of the prompt has {tokens}; send the preprocessing step's grid with "
                                 "its prompt")

    def _check_seconds_per_patch(self, token_types: np.ndarray, seconds) -> None:
        """Qwen2.5-VL: one SECOND_PER_GRID_TS value per clip, a positive number of seconds: each
        temporal patch of the clip is that much later in its temporal positions."""
        clips = len(_runs(token_types, VIDEO))
        seconds = np.zeros(0, np.float32) if seconds is None else seconds
        if not isinstance(seconds, np.ndarray) or seconds.ndim != 1 or seconds.dtype.kind != "f":
            raise ValueError(f"SECOND_PER_GRID_TS must be [videos] floats, got {_describe_array(seconds)}")
        if len(seconds) != clips:
            raise ValueError(f"SECOND_PER_GRID_TS describes {len(seconds)} video(s) but the prompt holds {clips} "
                             "run(s) of video tokens; send the preprocessing step's seconds per temporal patch with "
                             "its prompt")
        for index, value in enumerate(seconds.tolist()):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"SECOND_PER_GRID_TS[{index}] = {value} is not a positive number of seconds (temporal "
                                 "patch size / sampling fps)")

    def generate(
        self,
        requests: list[GenerationRequest],
        on_update: UpdateSink,
        is_cancelled: Callable[[int], bool] = lambda index: False,
    ) -> None:
        """Generate for every request; `on_update(index, update)` gets each request's updates.

        Every request gets exactly one update with `finished=True`, its last.
        """
        requests = [self.resolve(request) for request in requests]
        rows = [RowProgress(request, self.tokenizer, self.eos_ids, self.token_bytes) for request in requests]
        longest = max(len(r.input_ids) for r in requests)
        pad_lengths = [longest - len(r.input_ids) for r in requests]
        input_ids = torch.full((len(requests), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, pad_lengths[i] :] = torch.from_numpy(request.input_ids)
            attention_mask[i, pad_lengths[i] :] = 1
        sampling = _PerRequestSampling(rows, pad_lengths)
        progress = _PerRequestProgress(rows, sampling, on_update, is_cancelled)
        # Every field the rows' own sampling handles is set here to transformers' neutral value:
        # left unset, `generate` would fill it from the checkpoint's generation config and apply
        # it a second time (and before the confidence is taken).
        config = GenerationConfig(
            max_new_tokens=max(r.params.max_tokens for r in requests),
            do_sample=False,
            temperature=1.0,
            top_p=1.0,
            top_k=50,
            repetition_penalty=1.0,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            self.model.generate(
                generation_config=config,
                logits_processor=LogitsProcessorList([sampling]),
                stopping_criteria=StoppingCriteriaList([progress]),
                **self.model_inputs(requests, input_ids.to(self.device), attention_mask.to(self.device)),
            )
        for i, row in enumerate(rows):
            if not row.finish_reason:  # generate stopped at its own length limit
                on_update(i, row.end(FINISH_LENGTH))

    def model_inputs(self, requests: list[GenerationRequest], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model gets: the processor's `model_input_names` for images, with the pixels
        replaced by input embeddings that hold the encoder's rows (tests/unit/test_generation.py
        checks the names and values against transformers' processor).

        `generate` still gets the ids: Qwen2.5-VL computes its 3-D positions from them, the
        modality ids (`token_types`: image and video tokens), `image_grid_thw`, `video_grid_thw` and
        `second_per_grid_ts`, and both families track the generated sequence with them.
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        token_types = torch.from_numpy(self.token_types(input_ids.cpu().numpy())).to(self.device)
        if self.marks_modalities:
            inputs["mm_token_type_ids"] = token_types * attention_mask.to(torch.int32)
        with_media = [r for r in requests if r.image_embeds is not None and len(r.image_embeds)]
        if not with_media:
            return inputs
        embeddings = self.model.get_input_embeddings()(input_ids)
        rows = torch.from_numpy(np.concatenate([r.image_embeds for r in with_media]))
        mask = (token_types != TEXT).unsqueeze(-1)
        inputs["inputs_embeds"] = embeddings.masked_scatter(mask, rows.to(embeddings))
        # Each tensor's rows, request after request (a request without one holds none of its kind);
        # one with no rows at all is left out, as the processor leaves out the video tensors without clips.
        for name in dict.fromkeys(name for r in with_media for name in r.language_tensors):
            joined = np.concatenate([r.language_tensors[name] for r in with_media if name in r.language_tensors])
            if len(joined):
                inputs[name] = torch.from_numpy(joined).to(self.device)
        return inputs
