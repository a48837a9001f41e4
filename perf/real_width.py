"""A Qwen2.5-VL-7B text model at real width with few layers, for the engine's CPU rows: hidden
3,584, 28 heads, 4 key/value heads, head dim 128, intermediate 18,944, random fp32 weights,
vocabulary cut to 8,192, so that attention and cache traffic weigh as they do at full depth.
Built from the tiny checkpoint's configuration (build/models/qwen2_5_vl, `make models`)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, KV_HEADS, HEAD_DIM, VOCAB = 3584, 4, 128, 8192
IMAGE_TOKEN, IMAGE_SIDE = 8000, 24  # a 24 x 24 grid of merged patches: 576 image tokens
EOS = VOCAB - 1


def model_at_real_width(layers: int = 2):
    config = AutoConfig.from_pretrained(ROOT / "build/models/qwen2_5_vl")
    text = config.text_config
    text.hidden_size, text.num_attention_heads, text.num_key_value_heads = HIDDEN, 28, KV_HEADS
    text.intermediate_size, text.num_hidden_layers, text.vocab_size = 18944, layers, VOCAB
    text.layer_types = ["full_attention"] * layers
    text.rope_parameters["mrope_section"] = [16, 24, 24]
    text.max_position_embeddings = 32768
    config.vision_config.out_hidden_size = HIDDEN
    config.image_token_id = IMAGE_TOKEN
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = EOS
    return model
