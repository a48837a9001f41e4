"""Load a family's checkpoint from a local folder, quantized as configured.

Quantization modes:
- `none`: the checkpoint's weights as they are (float32 on CPU, bfloat16 on GPU): exact output.
- `int8`: PyTorch dynamic int8 quantization of every `nn.Linear` (CPU).
- `bnb-int8` / `bnb-nf4`: bitsandbytes 8-bit or 4-bit NF4 weights at load time (GPU).
- `awq`: a pre-quantized AWQ checkpoint, as its own config describes (GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

QUANTIZATIONS = ("none", "int8", "bnb-int8", "bnb-nf4", "awq")
GPU_ONLY = ("bnb-int8", "bnb-nf4", "awq")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be served as configured; the message says what to fix."""


def context_tokens(config) -> int:
    """The most tokens (prompt, image and generated together) one sequence may hold: the text
    model's `max_position_embeddings` from the checkpoint's (transformers) config."""
    return int(getattr(config.get_text_config(), "max_position_embeddings", 32768))


def load_model(checkpoint_dir: str | Path, quantization: str = "none", device: str = "cpu"):
    """The model in eval mode on `device`, loaded with `from_pretrained(local_files_only=True)`."""
    from transformers import AutoModelForImageTextToText

    directory = Path(checkpoint_dir)
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"no checkpoint at {directory} (config.json missing): build the tiny ones with `make models` "
            "or point the model's `checkpoint` parameter / environment override at real weights"
        )
    if quantization not in QUANTIZATIONS:
        raise CheckpointError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    on_gpu = device.startswith("cuda")
    if quantization in GPU_ONLY and not on_gpu:
        raise CheckpointError(f"quantization {quantization!r} needs a GPU instance (KIND_GPU); use int8 on CPU")
    if quantization == "int8" and on_gpu:
        raise CheckpointError("quantization 'int8' is PyTorch's CPU dynamic quantization; use bnb-int8 on GPU")

    model = AutoModelForImageTextToText.from_pretrained(directory, **load_kwargs(directory, quantization, device)).eval()
    if quantization == "none" and on_gpu:
        model = model.to(device)
    if quantization == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def load_kwargs(directory: Path, quantization: str, device: str) -> dict:
    """`from_pretrained` arguments for a quantization mode (its quantization config, placement, dtype).

    The GPU modes need packages beyond transformers (requirements-triton.txt): bitsandbytes and
    accelerate for bnb-*, gptqmodel and accelerate for awq.
    """
    on_gpu = device.startswith("cuda")
    kwargs: dict = {"local_files_only": True}
    if quantization in ("bnb-int8", "bnb-nf4"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantization == "bnb-int8"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        )
        kwargs["device_map"] = {"": device}
    elif quantization == "awq":
        method = json.loads((directory / "config.json").read_text()).get("quantization_config", {})
        if method.get("quant_method") != "awq":
            raise CheckpointError(f"{directory} is not an AWQ checkpoint (config.json has no awq quantization_config)")
        kwargs["device_map"] = {"": device}
    else:
        kwargs["dtype"] = torch.bfloat16 if on_gpu else torch.float32
    return kwargs


def load_tokenizer(checkpoint_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(checkpoint_dir), local_files_only=True)
