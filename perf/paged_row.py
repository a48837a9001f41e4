"""Decode step time, paged cache ÷ dense cache, at real width (issue 25).

A Qwen2.5-VL-7B text shape (hidden 3,584, 28 heads, 4 key/value heads, head dim 128, intermediate
18,944) with 2 layers and random fp32 weights (vocabulary cut to 8,192), so that attention and
cache traffic weigh as they do at full depth. One decode step for ROWS rows of LENGTH cached
positions each:
- dense: transformers' `DynamicCache` over the rows, left-padded mask (what the engine kept before
  issue 25): each step's `torch.cat` appends a column by rewriting every layer's whole cache;
- paged: the engine's `PagedKV` + `paged_rows` attention, the same forward the engine runs
  (`plan` included): each step writes its new keys in place.
Then the prefix cache, through the engine on the same model (an image of IMAGE_TOKENS tokens with
random embeddings, prompts of random token ids): a chat's second turn, its time to first token and
the share of its prompt found in the cache, with the cache on and off; five questions about one
document image, their prefill tokens with the cache on and off, asked one after another and all at once.
Each row is printed the moment it is measured.

Run: .venv/bin/python -m perf.paged_row [--rows 32] [--length 2048] [--repeats 3] [--what decode|prefix|all]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, DynamicCache, Qwen2_5_VLForConditionalGeneration

from perf.engine import IdTokenizer
from vlm_serving.generation.batch import BatchGenerator, GenerationRequest
from vlm_serving.generation.engine import InflightEngine, RequestSink
from vlm_serving.generation.paged_cache import PREPARED_MASK, PagedKV, use_paged_attention
from vlm_serving.generation.sampling import SamplingParams
from vlm_serving.generation.scheduling import EngineLimits

ROOT = Path(__file__).resolve().parents[1]
KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 4, 128, 2, 16
IMAGE_TOKEN, IMAGE_SIDE = 8000, 24  # a 24 x 24 grid of merged patches: 576 image tokens


def model_at_real_width():
    config = AutoConfig.from_pretrained(ROOT / "build/models/qwen2_5_vl")
    text = config.text_config
    text.hidden_size, text.num_attention_heads, text.num_key_value_heads = 3584, 28, KV_HEADS
    text.intermediate_size, text.num_hidden_layers, text.vocab_size = 18944, LAYERS, 8192
    text.layer_types = ["full_attention"] * LAYERS
    text.rope_parameters["mrope_section"] = [16, 24, 24]
    text.max_position_embeddings = 32768
    config.vision_config.out_hidden_size = 3584
    config.image_token_id = IMAGE_TOKEN
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 8191
    return model


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


def request(rng, image: np.ndarray, text: list[int], max_tokens: int) -> GenerationRequest:
    """20 random tokens, the image, then `text`."""
    ids = np.concatenate([rng.integers(100, 7000, 20), np.full(len(image), IMAGE_TOKEN), text]).astype(np.int64)
    grid = {"image_grid_thw": np.array([[1, 2 * IMAGE_SIDE, 2 * IMAGE_SIDE]], dtype=np.int64)}
    return GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, stream=True), image, grid, len(image))


def serve(engine: InflightEngine, requests: list[GenerationRequest]) -> list[tuple[float, list[int]]]:
    """Submit the requests together, step until all are answered: each one's seconds to its first
    token and its tokens."""
    started, firsts, tokens = time.perf_counter(), [None] * len(requests), [[] for _ in requests]

    def sink(i):
        def update(update):
            firsts[i] = firsts[i] or time.perf_counter() - started
            tokens[i].extend(update.token_ids)
        return RequestSink(update, lambda exc: (_ for _ in ()).throw(exc))
    for i, one in enumerate(requests):
        engine.submit(one, sink(i))
    while not engine.idle:
        engine.step()
    return list(zip(firsts, tokens))


def prefix_rows(model) -> None:
    use_paged_attention(model)
    generator = BatchGenerator("qwen2_5_vl", model, IdTokenizer())
    rng = np.random.default_rng(0)
    image = (rng.standard_normal((IMAGE_SIDE * IMAGE_SIDE, 3584)) * 0.02).astype(np.float32)
    first_text = rng.integers(100, 7000, 20).tolist()
    ttft, cached = {}, {}
    for caching in (True, False):
        engine = InflightEngine(generator, EngineLimits(prefix_caching=caching, prefill_chunk_tokens=2048))
        turn = request(np.random.default_rng(1), image, first_text, 16)
        [(_, answer)] = serve(engine, [turn])
        following = request(np.random.default_rng(1), image, first_text + answer + rng.integers(100, 7000, 20).tolist(), 4)
        before = engine.stats.cached_tokens
        [(ttft[caching], _)] = serve(engine, [following])
        cached[caching] = (engine.stats.cached_tokens - before) / len(following.input_ids)
    print(f"| second turn of a chat with one image ({len(following.input_ids)} prompt tokens): time to first token, "
          f"cache on / off | {ttft[True] * 1000:.0f} ms | {ttft[False] * 1000:.0f} ms | "
          f"{ttft[True] / ttft[False]:.2f}x |", flush=True)
    print(f"| second turn: cached tokens / prompt tokens | {cached[True]:.2f} | {cached[False]:.2f} | - |", flush=True)
    questions = [request(np.random.default_rng(2), image, rng.integers(100, 7000, 15).tolist(), 4) for _ in range(5)]
    for together in (False, True):
        prefilled = {}
        for caching in (True, False):
            engine = InflightEngine(generator, EngineLimits(prefix_caching=caching, prefill_chunk_tokens=2048))
            for batch in ([questions] if together else [[q] for q in questions]):
                serve(engine, batch)
            prefilled[caching] = engine.stats.prefill_tokens
        print(f"| five questions about one document image, {'all at once' if together else 'one after another'}: "
              f"prefill tokens, cache on / off | {prefilled[True]} | {prefilled[False]} | "
              f"{prefilled[True] / prefilled[False]:.2f}x |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--what", choices=("decode", "prefix", "all"), default="all")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows, length = args.rows, args.length
    model = model_at_real_width()
    if args.what in ("prefix", "all"):
        print("Prefix cache, Qwen2.5-VL-7B width, 2 layers, fp32, 2 threads, through the engine", flush=True)
        print("| measure | cache on | cache off | on / off |\n| --- | --- | --- | --- |", flush=True)
        with torch.inference_mode():
            prefix_rows(model)
    if args.what == "prefix":
        return 0
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
