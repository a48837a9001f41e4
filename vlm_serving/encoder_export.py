"""Export each family's vision encoder to ONNX from a transformers checkpoint.

    python -m vlm_serving.encoder_export build/models/qwen2_5_vl            # -> <checkpoint>/onnx/
    python -m vlm_serving.encoder_export /weights/qwen2.5-vl-7b --variants fp16

writes ``encoder.<variant>.onnx`` (fp32; int8: ONNX Runtime dynamic quantization, for CPU; fp16: for
the CUDA provider; all three unless ``--variants`` says otherwise) plus ``encoder.json`` (family,
hidden size) into ``<checkpoint>/onnx/``.

The graphs take the inputs of `vlm_serving.encoder_inputs` (patches plus precomputed index tensors)
with dynamic patch and image counts. Two changes make the towers exportable, neither changes the
arithmetic: attention within each image is one `scaled_dot_product_attention` call with a
block-diagonal mask built from ``cu_seqlens`` (transformers splits by ``cu_seqlens.tolist()``, which
cannot be traced), and Pixtral's patch convolution is a matmul on flattened patches.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlm_serving.encoder_inputs import OUTPUT_NAME, SPECS

VARIANTS = ("fp32", "int8", "fp16")
DEFAULT_VARIANTS = VARIANTS


def segment_mask(cu_seqlens: torch.Tensor, length: int | torch.SymInt) -> torch.Tensor:
    """bool [1, 1, n, n]: True where two rows lie in the same segment of ``cu_seqlens``."""
    positions = torch.arange(length, device=cu_seqlens.device)
    segment = (positions[:, None] >= cu_seqlens[None, 1:].to(positions.dtype)).sum(-1)
    return (segment[:, None] == segment[None, :])[None, None]


def _qwen_masked_attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen2.5-VL vision attention with one masked SDPA call instead of a split per segment."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=segment_mask(cu_seqlens, length), scale=self.scaling
    )
    return self.proj(output.squeeze(0).transpose(0, 1).reshape(length, -1))


class QwenVisionEncoder(torch.nn.Module):
    """``model.model.visual`` (patch embed, blocks, merger) on precomputed index tensors."""

    def __init__(self, model):
        super().__init__()
        self.visual = copy.deepcopy(model.model.visual).float().eval()
        for block in self.visual.blocks:
            block.attn.forward = types.MethodType(_qwen_masked_attention, block.attn)

    def forward(self, pixel_values, position_ids, cu_seqlens, window_index, cu_window_seqlens):
        grid_unused = torch.zeros((1, 3), dtype=torch.int64)  # every index tensor is given
        output = self.visual(
            pixel_values, grid_thw=grid_unused, position_ids=position_ids, cu_seqlens=cu_seqlens,
            window_index=window_index, cu_window_seqlens=cu_window_seqlens,
        )
        return output.pooler_output


class PixtralVisionEncoder(torch.nn.Module):
    """Pixtral's vision tower + the Llava projector on flattened patches."""

    def __init__(self, model):
        super().__init__()
        inner = model.model
        config = model.config
        if config.vision_feature_select_strategy != "full" or config.vision_feature_layer not in (-1,):
            raise ValueError(
                "only Pixtral checkpoints with vision_feature_select_strategy='full' and vision_feature_layer=-1 "
                "are supported (as Pixtral-12B ships)"
            )
        self.tower = copy.deepcopy(inner.vision_tower).float().eval()
        self.projector = copy.deepcopy(inner.multi_modal_projector).float().eval()
        weight = self.tower.patch_conv.weight  # [hidden, 3, p, p]
        self.patch_weight = torch.nn.Parameter(weight.detach().reshape(weight.shape[0], -1).clone())

    def forward(self, pixel_values, position_ids, cu_seqlens):
        embeds = self.tower.ln_pre((pixel_values @ self.patch_weight.T)[None])
        position_embeddings = self.tower.patch_positional_embedding(embeds, position_ids)
        same_image = segment_mask(cu_seqlens, embeds.shape[1])
        mask = torch.zeros(same_image.shape, dtype=embeds.dtype).masked_fill(~same_image, torch.finfo(embeds.dtype).min)
        hidden = self.tower.transformer(embeds, attention_mask=mask, position_embeddings=position_embeddings)
        return self.projector(hidden.last_hidden_state)[0]


WRAPPERS = {"qwen2_5_vl": QwenVisionEncoder, "pixtral": PixtralVisionEncoder}


def family_of(checkpoint: Path) -> str:
    model_type = json.loads((checkpoint / "config.json").read_text())["model_type"]
    return {"qwen2_5_vl": "qwen2_5_vl", "llava": "pixtral"}.get(model_type) or sys.exit(
        f"{checkpoint}: model_type {model_type!r} has no encoder export (qwen2_5_vl or llava/pixtral)"
    )


def example_inputs(family: str, model) -> dict[str, np.ndarray]:
    """Two images of different sizes: export traces a multi-image call."""
    from vlm_serving.encoder_inputs import pack, pixtral_image_inputs, qwen_image_inputs

    generator = np.random.default_rng(0)
    if family == "qwen2_5_vl":
        config = model.config.vision_config
        dim = 3 * config.temporal_patch_size * config.patch_size**2
        images = [
            qwen_image_inputs(generator.standard_normal((h * w, dim), dtype=np.float32), np.array([1, h, w]), config)
            for h, w in ((8, 12), (12, 8))
        ]
    else:
        patch = model.config.vision_config.patch_size
        images = [
            pixtral_image_inputs(generator.standard_normal((h * w, 3 * patch * patch), dtype=np.float32), h, w)
            for h, w in ((3, 5), (4, 2))
        ]
    return pack(images, SPECS[family]).tensors


def export_fp32(family: str, model, path: Path) -> None:
    wrapper = WRAPPERS[family](model).eval()
    inputs = example_inputs(family, model)
    names = [entry.name for entry in SPECS[family]]
    args = tuple(torch.from_numpy(inputs[name]) for name in names)
    dynamic = {name: {0: torch.export.Dim.DYNAMIC} for name in names}
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, args, dynamo=True, input_names=names, output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic, optimize=True, verbose=False,
        )
    program.save(str(path))


def export_int8(source: Path, path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    # The exporter's value_info trips quantization's shape inference ("Inferred shape and existing
    # shape differ"); ONNX Runtime infers the shapes again anyway.
    del model.graph.value_info[:]
    stripped = path.with_suffix(".tmp.onnx")
    onnx.save(model, str(stripped))
    try:
        quantize_dynamic(str(stripped), str(path), weight_type=QuantType.QInt8)
    finally:
        stripped.unlink(missing_ok=True)


def export_fp16(source: Path, path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # fp32 inputs and outputs stay: callers and the cache see one dtype whatever the variant.
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(path))


def export(checkpoint: Path, variants=DEFAULT_VARIANTS, out_dir: Path | None = None, force: bool = False) -> Path:
    from transformers import AutoModelForImageTextToText

    out_dir = out_dir or checkpoint / "onnx"
    family = family_of(checkpoint)
    fp32 = out_dir / "encoder.fp32.onnx"
    weights = max(path.stat().st_mtime for path in checkpoint.glob("*.safetensors"))

    def current(path: Path) -> bool:  # exported from these weights (not from a checkpoint since rebuilt)
        return path.is_file() and path.stat().st_mtime >= weights

    force = force or not current(fp32)
    wanted = [v for v in variants if force or not current(out_dir / f"encoder.{v}.onnx")]
    if not wanted:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32).eval()
    if force:
        export_fp32(family, model, fp32)
    if "int8" in wanted:
        export_int8(fp32, out_dir / "encoder.int8.onnx")
    if "fp16" in wanted:
        export_fp16(fp32, out_dir / "encoder.fp16.onnx")
    hidden = model.config.get_text_config().hidden_size
    (out_dir / "encoder.json").write_text(json.dumps({"family": family, "hidden_size": hidden}, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a checkpoint's vision encoder to ONNX.")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="transformers checkpoint folder(s)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--force", action="store_true", help="export again even where files exist")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(","))
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(unknown)}; use {', '.join(VARIANTS)}")
    for checkpoint in args.checkpoints:
        started = time.perf_counter()
        out_dir = export(checkpoint, variants, force=args.force)
        print(f"{out_dir}: {', '.join(variants)} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
