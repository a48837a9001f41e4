"""transformers' own processing and generation: what the service must equal.

Qwen2.5-VL: `Qwen2_5_VLProcessor` itself (its chat template, placeholder expansion, tokenization
and `mm_token_type_ids`), built without its video processor: that one needs torchvision, which
does not install beside this CPU torch, so the class check of the absent video
processor is skipped and nothing else.
Pixtral: `PixtralProcessor`'s module imports torchvision at import, so its `__call__` is followed
step by step with transformers' pieces (the checkpoint's image processor, the chat template, the
placeholder rows as text, the whole prompt tokenized at once); its `model_input_names` are
computed as `ProcessorMixin.model_input_names` does, from the tokenizer's and image processor's.
"""

from __future__ import annotations

import collections
import functools
import json

from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.processing_utils import ProcessorMixin

# Names a processor returns that only videos produce.
VIDEO_ONLY = frozenset({"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"})


def qwen_processor(checkpoint: Path):
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    check = ProcessorMixin.check_argument_for_proper_class

    def check_all_but_the_missing_video_processor(self, name, argument):
        return None if argument is None else check(self, name, argument)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=True)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check_all_but_the_missing_video_processor):
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=tokenizer.chat_template)


def model_input_names(family: str, checkpoint: Path) -> list[str]:
    """The processor's `model_input_names`."""
    if family == "qwen2_5_vl":
        return list(qwen_processor(checkpoint).model_input_names)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=True)
    return list(tokenizer.model_input_names) + list(image_processor.model_input_names)


def processor_inputs(family: str, checkpoint: Path, messages: list, images: list[Image.Image],
                     size: dict | None = None) -> dict:
    """Every tensor the processor returns for one request, batch dimension dropped, as numpy.
    `size`: the image processor's `size` argument for every image (None: the checkpoint's)."""
    image_kwargs = {"size": size} if size else {}
    if family == "qwen2_5_vl":
        processor = qwen_processor(checkpoint)
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = processor(text=[prompt], images=images or None, return_tensors="np", **image_kwargs)
        tensors = {name: np.asarray(value) for name, value in out.items()}
        for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
            tensors[name] = tensors[name][0].astype(np.int64)
        return tensors
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tensors: dict[str, np.ndarray] = {}
    if images:
        image_processor = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=True)
        tensors = dict(image_processor(images, return_tensors="np", **image_kwargs))
    expansions = []
    for height, width in tensors.get("image_sizes", []):
        rows = [["[IMG]"] * (width // 16) + ["[IMG_BREAK]"]] * (height // 16)
        flat = [token for row in rows for token in row]
        flat[-1] = "[IMG_END]"
        expansions.append("".join(flat))
    pieces = prompt.split("[IMG]")
    assert len(pieces) == len(expansions) + 1
    text = pieces[0] + "".join(e + p for e, p in zip(expansions, pieces[1:]))
    encoded = tokenizer(text, add_special_tokens=False)
    tensors["input_ids"] = np.asarray(encoded["input_ids"], dtype=np.int64)
    tensors["attention_mask"] = np.asarray(encoded["attention_mask"], dtype=np.int64)
    return tensors


@functools.lru_cache(maxsize=None)
def served_size(family: str, checkpoint: Path) -> dict:
    """The image processor `size` at which the service processes every image of a tiny checkpoint:
    each resolution preset clamps to the checkpoint's own maximum (tests/unit/test_preprocess.py)."""
    from vlm_serving.preprocessing.image_kind import ImageKind
    from vlm_serving.preprocessing.preprocess import load_preprocessor

    preprocessor = load_preprocessor(family, checkpoint)
    sizes = {json.dumps(preprocessor.transformers_size(preprocessor.presets.range_for(kind, None))) for kind in ImageKind}
    assert len(sizes) == 1, f"{checkpoint}: the image kinds get different sizes {sizes}; pass each request's own"
    return json.loads(sizes.pop())


def transformers_generate(family: str, checkpoint: Path, messages: list, images: list[Image.Image], max_new_tokens: int,
                          size: dict | None = None, **generate_kwargs) -> list[int]:
    """Greedy tokens from plain `generate` on the checkpoint with every processor tensor (images
    resized at `size`, as `processor_inputs`)."""
    inputs = processor_inputs(family, checkpoint, messages, images, size)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
    batch = {name: torch.from_numpy(np.asarray(value)) for name, value in inputs.items()}
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if name in batch:
            batch[name] = batch[name][None]
    prompt_length = batch["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return out[0, prompt_length:].tolist()


def transformers_logprobs(family: str, checkpoint: Path, messages: list, images: list[Image.Image], answer: list[int],
                          size: dict | None = None) -> torch.Tensor:
    """float32 [len(answer), vocab]: the log-softmax of the checkpoint's own logits at each token of
    `answer`, from one forward over every processor tensor (images resized at `size`) with the
    answer's tokens appended to the prompt."""
    inputs = processor_inputs(family, checkpoint, messages, images, size)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
    batch = {name: torch.from_numpy(np.asarray(value)) for name, value in inputs.items()}
    prompt_length = len(batch["input_ids"])
    appended = {"input_ids": torch.tensor(answer), "attention_mask": torch.ones(len(answer), dtype=torch.long),
                "mm_token_type_ids": torch.zeros(len(answer), dtype=torch.long)}
    for name, tail in appended.items():
        if name in batch:
            batch[name] = torch.cat([batch[name], tail.to(batch[name].dtype)])[None]
    with torch.inference_mode():
        logits = model(**batch).logits[0, prompt_length - 1 : prompt_length - 1 + len(answer)]
    return torch.log_softmax(logits.float(), dim=-1)


def openai_penalized_greedy(model, eos_ids: set[int], prompt_ids: list[int], steps: int, presence: float,
                            frequency: float) -> list[int]:
    """Greedy decoding of a text prompt with the penalties as OpenAI documents them, on the model's
    real logits: mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, where
    c[j] counts token j in the answer so far. Ends before an end token, as the answer's ids do."""
    answer: list[int] = []
    for _ in range(steps):
        with torch.inference_mode():
            mu = model(input_ids=torch.tensor([prompt_ids + answer])).logits[0, -1].float().tolist()
        for token, count in collections.Counter(answer).items():
            mu[token] = mu[token] - count * frequency - float(count > 0) * presence
        token = max(range(len(mu)), key=mu.__getitem__)
        if token in eos_ids:
            break
        answer.append(token)
    return answer


def grammar_greedy(model, matcher, vocab_size: int, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding of a text prompt under a grammar, on the model's real logits, one whole
    forward per token: at each step the likeliest token among those the xgrammar `matcher` allows,
    and its log-probability renormalised over them. Every token chosen (the end token included)
    with its value; stops when the grammar is complete."""
    import xgrammar as xgr

    answer: list[int] = []
    values: list[float] = []
    for _ in range(steps):
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + answer])).logits[0, -1].float(), dim=-1)
        bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        matcher.fill_next_token_bitmask(bitmask, 0)
        allowed = [token for token in range(vocab_size) if int(bitmask[0, token // 32]) >> (token % 32) & 1]
        token = max(allowed, key=lambda candidate: logprobs[candidate].item())
        values.append((logprobs[token] - torch.logsumexp(logprobs[allowed], dim=0)).item())
        answer.append(token)
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            break
    return answer, values
