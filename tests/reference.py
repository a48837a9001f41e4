"""The transformers processors' steps, run with transformers' own pieces.

`Qwen2_5_VLProcessor` and `PixtralProcessor` refuse to construct without torchvision (which cannot
be installed beside this CPU torch), so the tests follow what their `__call__` does: the
checkpoint's image processor (`AutoImageProcessor`), the chat template, the placeholder expanded
as *text* (`replace_image_token`) and the whole prompt tokenized at once. That is independent of
the service's own path (lookup-table normalization, expansion in token ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer


def processor_inputs(family: str, checkpoint: Path, messages: list, images: list[Image.Image]) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tensors: dict[str, np.ndarray] = {}
    if images:
        image_processor = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=True)
        tensors = dict(image_processor(images, return_tensors="np"))
    if family == "qwen2_5_vl":
        placeholder = "<|image_pad|>"
        merge = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=True).merge_size if images else 2
        expansions = [placeholder * int(grid.prod() // merge**2) for grid in tensors.get("image_grid_thw", [])]
    else:
        placeholder = "[IMG]"
        expansions = []
        for height, width in tensors.get("image_sizes", []):
            rows = [["[IMG]"] * (width // 16) + ["[IMG_BREAK]"]] * (height // 16)
            flat = [token for row in rows for token in row]
            flat[-1] = "[IMG_END]"
            expansions.append("".join(flat))
    pieces = prompt.split(placeholder)
    assert len(pieces) == len(expansions) + 1
    text = pieces[0] + "".join(e + p for e, p in zip(expansions, pieces[1:]))
    tensors["input_ids"] = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return tensors


def transformers_generate(family: str, checkpoint: Path, messages: list, images: list[Image.Image], max_new_tokens: int) -> list[int]:
    """Greedy tokens from plain `generate` on the checkpoint (the service must match these)."""
    inputs = processor_inputs(family, checkpoint, messages, images)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
    ids = torch.from_numpy(inputs.pop("input_ids"))[None]
    extra = {key: torch.from_numpy(np.asarray(value)) for key, value in inputs.items()}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, **extra
        )
    return out[0, ids.shape[1] :].tolist()
