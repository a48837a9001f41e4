"""Export each family's vision encoder to ONNX from a transformers checkpoint.

    python -m vlm_serving.encoding.encoder_export build/models/qwen2_5_vl            # -> <checkpoint>/onnx/
    python -m vlm_serving.encoding.encoder_export /weights/qwen2.5-vl-7b --variants fp16

writes ``encoder.<variant>.onnx`` (fp32; int8: ONNX Runtime dynamic quantization, for CPU; fp16: for
the CUDA provider; all three unless ``--variants`` says otherwise) plus ``encoder.json`` (family,
hidden size) into ``<checkpoint>/onnx/``.

The graphs take the inputs of `vlm_serving.encoding.encoder_inputs.graph_inputs` (patches plus precomputed
index tensors) with dynamic patch, image and window counts. Two changes make the towers
exportable, neither changes the arithmetic: attention within each segment (image, or Qwen's
window) runs as one batched `scaled_dot_product_attention` over the segments padded to the
longest (transformers splits by ``cu_seqlens.tolist()``, which cannot be traced), and Pixtral's
patch convolution is a matmul on flattened patches.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlm_serving.encoding.encoder import VARIANTS
from vlm_serving.encoding.encoder_inputs import OUTPUT_NAME, SPECS



def segment_attention(query, key, value, gather, scatter, scale: float) -> torch.Tensor:
    """Attention within each segment (an image, or one of Qwen's windows) as one batched call.

    query/key/value [rows, heads, dim]; `gather` [segments, longest] and `scatter` [rows] come from
    `vlm_serving.encoding.encoder_inputs.segment_layout`: rows are gathered into a padded segment batch
    (padding slots point at an appended zero row and are masked as keys), attended, and
    scattered back to row order. Costs segments x longest^2, not rows^2.
    """
    rows, heads, dim = query.shape
    pad = query.new_zeros((1, heads, dim))
    batched = [torch.cat([t, pad])[gather].transpose(1, 2) for t in (query, key, value)]  # [S, H, L, D]
    # An additive [S, 1, 1, L] mask: broadcast in one Add (a boolean mask became a Where over the
    # whole [S, H, L, L] score tensor in ONNX Runtime, 17% of the encoder's time).
    padding = (gather >= rows)[:, None, None, :]
    mask = torch.zeros(padding.shape, dtype=query.dtype).masked_fill(padding, torch.finfo(query.dtype).min)
    output = F.scaled_dot_product_attention(*batched, attn_mask=mask, scale=scale)
    return output.transpose(1, 2).reshape(-1, heads, dim)[scatter]


class QwenVisionEncoder(torch.nn.Module):
    """``model.model.visual`` (patch embed, blocks, merger) on precomputed index tensors; its blocks'
    own modules, with attention by `segment_attention` (transformers splits by
    ``cu_seqlens.tolist()``, which cannot be traced)."""

    def __init__(self, model):
        super().__init__()
        self.visual = copy.deepcopy(model.model.visual).float().eval()
        # The patch embedding is a Conv3d whose kernel is the whole patch: a matmul on the flattened
        # patches, which preprocessing lays out in the kernel's (channel, time, y, x) order.
        weight = self.visual.patch_embed.proj.weight
        self.patch_weight = torch.nn.Parameter(weight.detach().reshape(weight.shape[0], -1).clone())

    def _attention(self, attn, hidden, position_embeddings, gather, scatter):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        rows = hidden.shape[0]
        query, key, value = attn.qkv(hidden).reshape(rows, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
        return attn.proj(segment_attention(query, key, value, gather, scatter, attn.scaling).reshape(rows, -1))

    def forward(self, pixel_values, position_ids, window_index, segment_gather, segment_scatter,
                window_gather, window_scatter):
        visual = self.visual
        hidden = pixel_values @ self.patch_weight.T
        rows = hidden.shape[0]
        hidden = visual.permute_input_for_window_attn(hidden, window_index, seq_len=rows)
        position_embeddings = tuple(
            visual.permute_input_for_window_attn(part, window_index, seq_len=rows)
            for part in visual.rotary_pos_emb(hidden, position_ids)
        )
        for index, block in enumerate(visual.blocks):
            layout = (segment_gather, segment_scatter) if index in visual.fullatt_block_indexes else (window_gather, window_scatter)
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), position_embeddings, *layout)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)[torch.argsort(window_index)]


class PixtralVisionEncoder(torch.nn.Module):
    """Pixtral's vision tower + the Llava projector on flattened patches (the patch convolution is a
    matmul on them), its layers' own modules with attention by `segment_attention`."""

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

    @staticmethod
    def _attention(attn, hidden, position_embeddings, gather, scatter):
        from transformers.models.pixtral.modeling_pixtral import apply_rotary_pos_emb

        rows = hidden.shape[0]
        query, key, value = (proj(hidden).view(rows, attn.num_heads, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings, unsqueeze_dim=1)
        return attn.o_proj(segment_attention(query, key, value, gather, scatter, attn.scaling).reshape(rows, -1))

    def forward(self, pixel_values, position_ids, segment_gather, segment_scatter):
        hidden = self.tower.ln_pre(pixel_values @ self.patch_weight.T)
        position_embeddings = self.tower.patch_positional_embedding(hidden, position_ids)
        for layer in self.tower.transformer.layers:
            hidden = hidden + self._attention(layer.attention, layer.attention_norm(hidden), position_embeddings,
                                              segment_gather, segment_scatter)
            hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
        return self.projector(hidden)


WRAPPERS = {"qwen2_5_vl": QwenVisionEncoder, "pixtral": PixtralVisionEncoder}


def family_of(checkpoint: Path) -> str:
    model_type = json.loads((checkpoint / "config.json").read_text())["model_type"]
    families = {"qwen2_5_vl": "qwen2_5_vl", "llava": "pixtral"}
    if model_type not in families:
        raise SystemExit(f"{checkpoint}: model_type {model_type!r} has no encoder export (qwen2_5_vl or llava/pixtral)")
    return families[model_type]


def example_inputs(family: str, model) -> dict[str, np.ndarray]:
    """Two images of different sizes: export traces a multi-image call."""
    from vlm_serving.encoding.encoder_inputs import graph_inputs, pack, pixtral_image_inputs, qwen_image_inputs

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
    return graph_inputs(pack(images, SPECS[family]).tensors)


def export_fp32(family: str, model, path: Path) -> None:
    wrapper = WRAPPERS[family](model).eval()
    inputs = example_inputs(family, model)
    names = list(inspect.signature(wrapper.forward).parameters)  # the graph's input order
    assert set(names) == set(inputs), (names, list(inputs))
    args = tuple(torch.from_numpy(inputs[name]) for name in names)
    # Every dimension is dynamic but the fixed widths (a patch's values, a position's two coordinates).
    dynamic = {name: {0: torch.export.Dim.DYNAMIC, **({1: torch.export.Dim.DYNAMIC} if name.endswith("_gather") else {})}
               for name in names}
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


def weights_mtime(checkpoint: Path) -> float:
    """When the checkpoint's weights last changed: safetensors files, or PyTorch `.bin` ones."""
    files = [path for pattern in ("*.safetensors", "*.bin") for path in checkpoint.glob(pattern)]
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no weights to export from (*.safetensors or *.bin)")
    return max(path.stat().st_mtime for path in files)


def export(checkpoint: Path, variants=VARIANTS, out_dir: Path | None = None, force: bool = False) -> Path:
    from transformers import AutoModelForImageTextToText

    out_dir = out_dir or checkpoint / "onnx"
    family = family_of(checkpoint)
    fp32 = out_dir / "encoder.fp32.onnx"
    weights = weights_mtime(checkpoint)

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
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--force", action="store_true", help="export again even where files exist")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(","))
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(unknown)}; use {', '.join(VARIANTS)}")
    # The exporter's and quantizer's advice (torchvision ops, training mode, pre-processing) does
    # not apply to these graphs; errors still surface.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.disable(logging.WARNING)
    for checkpoint in args.checkpoints:
        started = time.perf_counter()
        out_dir = export(checkpoint, variants, force=args.force)
        print(f"{out_dir}: {', '.join(variants)} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
