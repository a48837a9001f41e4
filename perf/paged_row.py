"""make bench rows 18a-18f (issue 25): the prefix cache and the decode step, paged ÷ dense, on the
Qwen2.5-VL-7B-width model of perf/real_width.py (2 layers, random fp32 weights).

First the prefix cache, through the engine (an image of 576 tokens with random embeddings, prompts
of random token ids): a chat's second turn, its time to first token and the share of its prompt
found in the cache, with the cache on and off; five questions about one document image, their
prefill tokens with the cache on and off, asked one after another and all at once. Then one
decode step for ROWS rows of LENGTH cached positions each:
- dense: transformers' `DynamicCache` over the rows, left-padded mask (what the engine kept before
  issue 25): each step's `torch.cat` appends a column by rewriting every layer's whole cache;
- paged: the engine's `PagedKV` + `paged_rows` attention, the same forward the engine runs
  (`plan` included): each step writes its new keys in place.
Each row is printed the moment it is measured.

Run: .venv/bin/python -m perf.paged_row [--rows 32] [--length 2048] [--repeats 3] [--what decode|prefix|all]
"""

from __future__ import annotations

import argparse
import sys
import time
import numpy as np
import torch
from transformers import DynamicCache

from perf.engine import IdTokenizer
from perf.real_width import HEAD_DIM, HIDDEN, IMAGE_SIDE, IMAGE_TOKEN, KV_HEADS, VOCAB, model_at_real_width
from vlm_serving.generation.batch import BatchGenerator, GenerationRequest
from vlm_serving.generation.engine import InflightEngine, RequestSink
from vlm_serving.generation.paged_cache import PREPARED_MASK, PagedKV, use_paged_attention
from vlm_serving.generation.sampling import SamplingParams
from vlm_serving.generation.scheduling import EngineLimits

LAYERS, BLOCK = 2, 16


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
    ids = torch.randint(0, VOCAB, (rows, 1))
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
    embeds = model.get_input_embeddings()(torch.randint(0, VOCAB, (rows,)))[None]
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


def prefix_rows(model) -> list[tuple]:
    """Through the engine: a chat's second turn and five questions about one document image, cache on and off."""
    use_paged_attention(model)
    generator = BatchGenerator("qwen2_5_vl", model, IdTokenizer())
    rng = np.random.default_rng(0)
    image = (rng.standard_normal((IMAGE_SIDE * IMAGE_SIDE, HIDDEN)) * 0.02).astype(np.float32)
    first_text = rng.integers(100, 7000, 20).tolist()
    ttft, cached = {}, {}
    with torch.inference_mode():
        for caching in (True, False):
            engine = InflightEngine(generator, EngineLimits(prefix_caching=caching, prefill_chunk_tokens=2048))
            turn = request(np.random.default_rng(1), image, first_text, 16)
            [(_, answer)] = serve(engine, [turn])
            following = request(np.random.default_rng(1), image, first_text + answer + rng.integers(100, 7000, 20).tolist(), 4)
            before = engine.stats.cached_tokens
            [(ttft[caching], _)] = serve(engine, [following])
            cached[caching] = (engine.stats.cached_tokens - before) / len(following.input_ids)
        table = [("18a", f"second turn of a chat with one image ({len(following.input_ids)} prompt tokens): time to first "
                  "token, prefix cache on / off", f"{ttft[True] * 1000:.0f} / {ttft[False] * 1000:.0f} ms",
                  ttft[True] / ttft[False], "<= 0.3", "x", ""),
                 ("18b", "second turn: cached tokens / prompt tokens, prefix cache on", f"{cached[True]:.2f} "
                  f"(off: {cached[False]:.2f})", cached[True], ">= 0.9", "x", "")]
        questions = [request(np.random.default_rng(2), image, rng.integers(100, 7000, 15).tolist(), 4) for _ in range(5)]
        for key, together in (("18c", False), ("18d", True)):
            prefilled = {}
            for caching in (True, False):
                engine = InflightEngine(generator, EngineLimits(prefix_caching=caching, prefill_chunk_tokens=2048))
                for batch in ([questions] if together else [[q] for q in questions]):
                    serve(engine, batch)
                prefilled[caching] = engine.stats.prefill_tokens
            table.append((key, f"five questions about one document image, {'all at once' if together else 'one after another'}: "
                          "prefill tokens, prefix cache on / off", f"{prefilled[True]} / {prefilled[False]}",
                          prefilled[True] / prefilled[False], "<= 0.3", "x", ""))
    return table


def decode_rows(model, rows: int, length: int, repeats: int) -> list[tuple]:
    with torch.inference_mode():
        dense, paged = dense_step(model, rows, length), paged_step(model, rows, length)
        # Alternated, best of each: the shared machine's load moves between runs, not within one.
        dense_ms = paged_ms = float("inf")
        for _ in range(repeats):
            model.set_attn_implementation("sdpa")
            dense_ms = min(dense_ms, best_ms(dense, 1))
            use_paged_attention(model)
            paged_ms = min(paged_ms, best_ms(paged, 1))
    # Dense: torch.cat writes a new tensor of every row's keys and values per layer (the old ones
    # copied whole). Paged: `index_copy_` writes the step's new keys and values only, cached ones
    # stay; attention then reads (gathers) each row's blocks.
    layer_bytes = rows * (length + 1) * KV_HEADS * HEAD_DIM * 4  # one layer's keys (or values), fp32
    new_bytes = LAYERS * 2 * rows * KV_HEADS * HEAD_DIM * 4
    shape = f"{rows} rows x {length} positions, Qwen2.5-VL-7B width, {LAYERS} layers, fp32"
    return [("18e", f"decode step time, paged / dense cache, {shape}", f"{paged_ms:.0f} / {dense_ms:.0f} ms",
             paged_ms / dense_ms, "<= 0.6", "x", ""),
            ("18f", f"cached key/value bytes copied per step, paged (dense: {LAYERS * 2 * layer_bytes / 2**20:.0f} MiB; "
             f"paged writes the step's {new_bytes / 2**10:.0f} KiB and gathers {LAYERS * 2 * layer_bytes / 2**20:.0f} MiB "
             "for attention)", "0 MiB", 0.0, "0", "MiB", "")]


def rows(quick: bool = False) -> list[tuple]:
    """perf.bench's rows (key, measure, measured, ratio, goal, unit, failed), each group printed by
    the caller as it comes."""
    torch.set_num_threads(2)
    model = model_at_real_width()
    return prefix_rows(model) + (decode_rows(model, 16, 1024, repeats=1) if quick else decode_rows(model, 32, 2048, 3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--what", choices=("decode", "prefix", "all"), default="all")
    args = parser.parse_args(argv)
    from perf.bench import Table

    torch.set_num_threads(2)
    model, table = model_at_real_width(), Table()
    if args.what in ("prefix", "all"):
        table.add(*prefix_rows(model))
    if args.what in ("decode", "all"):
        table.add(*decode_rows(model, args.rows, args.length, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
