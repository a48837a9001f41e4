"""Generate for a whole dynamic batch at once, each request with its own parameters.

One `transformers` `generate` call runs the batch (left padding, greedy argmax as the selection
rule). Two hooks make it per-request:
- `_PerRequestSampling` (a logits processor) applies each row's repetition penalty and, for rows
  that sample, draws the token with the row's own seeded generator and leaves only it selectable;
  greedy rows pass through untouched, so greedy output is exactly plain `generate`'s.
- `_PerRequestProgress` (a stopping criterion, called once per step with the new tokens) assembles
  each row's text, applies its stop sequences, max_tokens and cancellation, and reports updates.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers import StoppingCriteriaList

from vlm_serving.generation.loading import context_tokens
from vlm_serving.generation.sampling import SamplingDefaults, SamplingParams, TextAssembler

FINISH_STOP = "stop"  # end-of-sequence token or a stop sequence
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_CANCELLED = "cancelled"  # the caller went away


@dataclass
class GenerationRequest:
    """One request as the generator sees it: prompt ids, its images' embeddings, parameters."""

    input_ids: np.ndarray
    params: SamplingParams
    # float32 [image tokens, hidden]: the vision encoder's rows for the prompt's image tokens, in order.
    image_embeds: np.ndarray | None = None
    # What else the text model needs about the images (Qwen2.5-VL: image_grid_thw, for 3-D positions).
    language_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    image_tokens: int = 0


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
    # Mean log-probability of the generated tokens under the model (0 = certain); 0 before any token.
    confidence: float = 0.0


@dataclass
class _RowState:
    request: GenerationRequest
    text: TextAssembler
    logprobs: list[float] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""


UpdateSink = Callable[[int, RequestUpdate], None]


class _PerRequestSampling(LogitsProcessor):
    def __init__(self, rows: list[_RowState], pad_lengths: list[int]):
        self.rows = rows
        self.pad_lengths = pad_lengths
        self.generators = []
        for row in rows:
            seed = row.request.params.seed
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else random.getrandbits(63))
            self.generators.append(generator)
        self.last_logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last_logprobs = torch.log_softmax(scores.float(), dim=-1)
        for i, row in enumerate(self.rows):
            params = row.request.params
            if params.repetition_penalty != 1.0:
                seen = input_ids[i, self.pad_lengths[i] :]
                picked = scores[i].gather(0, seen)
                picked = torch.where(
                    picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty
                )
                scores[i].scatter_(0, seen, picked)
            if params.temperature > 0.0:
                token = self._sample(scores[i], params, self.generators[i])
                scores[i].fill_(float("-inf"))
                scores[i, token] = 0.0
        return scores

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
        logits = logits.float().cpu() / params.temperature
        if 0 < params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
            logits[order[drop]] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))


class _PerRequestProgress(StoppingCriteria):
    def __init__(
        self,
        rows: list[_RowState],
        sampling: _PerRequestSampling,
        eos_ids: set[int],
        on_update: UpdateSink,
        is_cancelled: Callable[[int], bool],
    ):
        self.rows = rows
        self.sampling = sampling
        self.eos_ids = eos_ids
        self.on_update = on_update
        self.is_cancelled = is_cancelled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1].tolist()
        logprobs = self.sampling.last_logprobs
        done = []
        for i, (row, token) in enumerate(zip(self.rows, new_tokens)):
            if not row.finish_reason:
                self._advance(i, row, token, float(logprobs[i, token]))
            done.append(bool(row.finish_reason))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _advance(self, index: int, row: _RowState, token: int, logprob: float) -> None:
        params = row.request.params
        row.logprobs.append(logprob)
        delta = ""
        if token in self.eos_ids:
            row.finish_reason = FINISH_STOP
        else:
            row.pending_ids.append(token)
            delta = row.text.add(token)
            if row.text.stopped:
                row.finish_reason = FINISH_STOP
            elif len(row.logprobs) >= params.max_tokens:
                row.finish_reason = FINISH_LENGTH
            elif self.is_cancelled(index):
                row.finish_reason = FINISH_CANCELLED
        if row.finish_reason:
            report(index, row, self.on_update, delta)
        elif params.stream and delta:
            self.on_update(index, RequestUpdate(text=delta, token_ids=row.pending_ids))
            row.pending_ids = []


def report(index: int, row: _RowState, on_update: UpdateSink, unsent: str) -> None:
    """The final update of a row: the last delta (streaming) or the whole text.

    `unsent` is text already released by the assembler but not yet sent.
    """
    stream = row.request.params.stream
    last_delta = unsent + row.text.flush()
    on_update(
        index,
        RequestUpdate(
            text=last_delta if stream else row.text.text,
            token_ids=row.pending_ids if stream else row.text.token_ids,
            finished=True,
            finish_reason=row.finish_reason,
            prompt_tokens=len(row.request.input_ids),
            completion_tokens=len(row.logprobs),
            image_tokens=row.request.image_tokens,
            confidence=float(np.mean(row.logprobs)) if row.logprobs else 0.0,
        ),
    )


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


class BatchGenerator:
    """Runs batches of `GenerationRequest`s through one loaded model."""

    def __init__(self, family: str, model, tokenizer, device: torch.device | str = "cpu"):
        self.family = family
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        config = model.generation_config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids))
        self.max_context = context_tokens(model.config)
        self.image_token_id = int(model.config.image_token_id)
        # Qwen2.5-VL builds its 3-D (multimodal rotary) positions only when given the processor's
        # per-token modality ids (0 text, 1 image); Llava/Pixtral takes none.
        self.marks_modalities = family == "qwen2_5_vl"
        # What requests get for the sampling fields they leave unset (the checkpoint's defaults).
        self.defaults = SamplingDefaults.from_generation_config(config.to_dict())

    def check_images(self, request: GenerationRequest) -> None:
        """Every image token of the prompt needs one embedding row, and nothing more."""
        placeholders = int((request.input_ids == self.image_token_id).sum())
        rows = 0 if request.image_embeds is None else len(request.image_embeds)
        if placeholders != rows:
            raise ValueError(f"the prompt holds {placeholders} image token(s) but {rows} image embedding row(s) came with it")

    def generate(
        self,
        requests: list[GenerationRequest],
        on_update: UpdateSink,
        is_cancelled: Callable[[int], bool] = lambda index: False,
    ) -> None:
        """Generate for every request; `on_update(index, update)` gets each request's updates.

        Every request gets exactly one update with `finished=True`, its last.
        """
        requests = [replace(request, params=request.params.resolve(self.defaults)) for request in requests]
        rows = [_RowState(request, TextAssembler(self.tokenizer, request.params.stop)) for request in requests]
        longest = max(len(r.input_ids) for r in requests)
        pad_lengths = [longest - len(r.input_ids) for r in requests]
        input_ids = torch.full((len(requests), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, pad_lengths[i] :] = torch.from_numpy(request.input_ids)
            attention_mask[i, pad_lengths[i] :] = 1
        sampling = _PerRequestSampling(rows, pad_lengths)
        progress = _PerRequestProgress(rows, sampling, self.eos_ids, on_update, is_cancelled)
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
                row.finish_reason = FINISH_LENGTH
                report(i, row, on_update, "")

    def model_inputs(self, requests: list[GenerationRequest], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model gets: the processor's `model_input_names` for images, with the pixels
        replaced by input embeddings that hold the encoder's rows (tests/unit/test_generation.py
        checks the names and values against transformers' processor).

        `generate` still gets the ids: Qwen2.5-VL computes its 3-D positions from them, the
        modality ids and `image_grid_thw`, and both families track the generated sequence with them.
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.marks_modalities:
            inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32) * attention_mask.to(torch.int32)
        with_images = [r for r in requests if r.image_embeds is not None and len(r.image_embeds)]
        if not with_images:
            return inputs
        embeddings = self.model.get_input_embeddings()(input_ids)
        rows = torch.from_numpy(np.concatenate([r.image_embeds for r in with_images]))
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        inputs["inputs_embeds"] = embeddings.masked_scatter(mask, rows.to(embeddings))
        for name in with_images[0].language_tensors:
            joined = np.concatenate([r.language_tensors[name] for r in with_images])
            inputs[name] = torch.from_numpy(joined).to(self.device)
        return inputs
