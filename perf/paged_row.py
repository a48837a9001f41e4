"""Decode step time, paged cache ÷ dense cache, at real width (issue 25).

A Qwen2.5-VL-7B text shape (hidden 3,584, 28 heads, 4 key/value heads, head dim 128, intermediate
18,944) with 2 layers and random fp32 weights (vocabulary cut to 8,192), so that attention and
cache traffic weigh as they do at full depth. One decode step for ROWS rows of LENGTH cached
positions each:
- dense: transformers' `DynamicCache` over the rows, left-padded mask (what the engine kept before
  issue 25): each step's `torch.cat` appends a column by rewriting every layer's whole cache;
- paged: the engine's `PagedKV` + `paged_rows` attention, the same forward the engine runs
  (`plan` included): each step writes its new keys in place.
Each row is printed the moment it is measured.

Run: .venv/bin/python -m perf.paged_row [--rows 32] [--length 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, DynamicCache, Qwen2_5_VLForConditionalGeneration

from vlm_serving.generation.paged_cache import PREPARED_MASK, PagedKV, use_paged_attention

ROOT = Path(__file__).resolve().parents[1]
KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 4, 128, 2, 16


def model_at_real_width():
    config = AutoConfig.from_pretrained(ROOT / "build/models/qwen2_5_vl")
    text = config.text_config
    text.hidden_size, text.num_attention_heads, text.num_key_value_heads = 3584, 28, KV_HEADS
    text.intermediate_size, text.num_hidden_layers, text.vocab_size = 18944, LAYERS, 8192
    text.layer_types = ["full_attention"] * LAYERS
    text.rope_parameters["mrope_section"] = [16, 24, 24]
    text.max_position_embeddings = 32768
    config.vision_config.out_hidden_size = 3584
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def best_ms(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def dense_step(model, rows: int, length: int):
    cache = DynamicCache(config=model.config)
    for layer in range(LAYERS):
        cache.update(torch.randn(rows, KV_HEADS, length, HEAD_DIM), torch.randn(rows, KV_HEADS, length, HEAD_DIM), layer)
    ids = torch.randint(0, 8192, (rows, 1))
    mask = torch.ones(rows, length + 1, dtype=torch.long)
    positions = torch.full((3, rows, 1), length)

    def step():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache.crop(-1)  # back to `length` columns (a view: no copy), so each step appends the same column
    return step


def paged_step(model, rows: int, length: int):
    cache = PagedKV(model, blocks=rows * (-(-(length + 1) // BLOCK)), block_tokens=BLOCK)
    for row in range(rows):
        cache.tables.grow(row, length + 1)
    for pool in cache.keys + cache.values:
        pool.normal_()
    embeds = model.get_input_embeddings()(torch.randint(0, 8192, (rows,)))[None]
    positions = torch.full((3, 1, rows), length)
    decoding = [(row, length) for row in range(rows)]

    def step():
        plan = cache.plan(decoding, [])  # the engine plans every step: its cost is in the time
        model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=False,
              attention_mask=PREPARED_MASK, paged_step=plan, logits_to_keep=torch.arange(rows))
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows, length = args.rows, args.length
    model = model_at_real_width()
    layer_bytes = rows * (length + 1) * KV_HEADS * HEAD_DIM * 4  # one layer's keys (or values), fp32
    print(f"Decode step, {rows} rows x {length} positions, Qwen2.5-VL-7B width, {LAYERS} layers, fp32, 2 threads",
          flush=True)
    print("| measure | dense | paged | paged / dense |\n| --- | --- | --- | --- |", flush=True)
    with torch.inference_mode():
        dense, paged = dense_step(model, rows, length), paged_step(model, rows, length)
        # Alternated, best of each: the shared machine's load moves between runs, not within one.
        dense_ms = paged_ms = float("inf")
        for _ in range(args.repeats):
            model.set_attn_implementation("sdpa")
            dense_ms = min(dense_ms, best_ms(dense, 1))
            use_paged_attention(model)
            paged_ms = min(paged_ms, best_ms(paged, 1))
    print(f"| decode step time | {dense_ms:.0f} ms | {paged_ms:.0f} ms | {paged_ms / dense_ms:.2f}x |", flush=True)
    # Dense: torch.cat writes a new tensor of every row's keys and values per layer (the old ones
    # copied whole). Paged: `index_copy_` writes the step's new keys and values only, cached ones stay.
    copied_dense = LAYERS * 2 * layer_bytes
    print(f"| cached key/value bytes copied per step | {copied_dense / 2**20:.0f} MiB | 0 MiB | 0 |", flush=True)
    new_bytes = LAYERS * 2 * rows * KV_HEADS * HEAD_DIM * 4
    print(f"| new key/value bytes written per step | {new_bytes / 2**10:.0f} KiB (inside the copy) | "
          f"{new_bytes / 2**10:.0f} KiB | - |", flush=True)
    print(f"| transient bytes gathered per step (attention reads its rows' blocks) | 0 | "
          f"{LAYERS * 2 * layer_bytes / 2**20:.0f} MiB | - |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
