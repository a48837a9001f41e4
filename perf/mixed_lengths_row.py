"""Mixed prompt lengths on the engine alone (issue 25), today's engine against the one before the
paged cache (perf/engine_before.py), each side in its own process on the same requests:

18g. rows admitted under one cache budget: 100 requests submitted at once, 90% with short prompts and
     10% with 3,072-token ones, all asking for 128 tokens, under a 32,768-token budget with room for
     128 rows: the mean number of running rows over the steps at which requests were still waiting.
     Before, admission reserved prompt + max_tokens at the longest row's width for every row (a long
     row in the batch caps it at 9 rows); now each row holds the blocks its tokens fill. The tiny
     Qwen2.5-VL checkpoint (admission does not depend on width).
18h. short requests beside one long prompt: the time to first token of 4 requests with 300-token
     prompts submitted together with one 4,096-token prompt, ÷ the same 4 alone (alternated, the best
     of two each; the engine before, once: its runs take minutes). Before, a prefill group was padded
     to its longest prompt and its chunk budget counted the padding; now prompts are packed unpadded
     and the step's 512 tokens are shared evenly among the prefilling rows (on the CPU, where a step
     costs what its tokens do, the shorts' 3 steps then carry 1,536 tokens instead of 1,200: 1.28x).
     The Qwen2.5-VL-7B-width model of perf/real_width.py (2 layers, fp32).

    .venv/bin/python -m perf.mixed_lengths_row [--quick]   # --quick: today's engine only, and 18h
                                                           # beside a 2,048-token prompt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from perf.engine_before import ROOT, run_measure

BUDGET, MAX_RUNNING = 32768, 128
SHORT_PROMPT, LONG_PROMPT, ANSWER = 200, 3072, 128
BESIDE_SHORTS, BESIDE_SHORT_PROMPT, BESIDE_LONG_PROMPT = 4, 300, 4096


def _engine(generator, **limits):
    from vlm_serving.generation.engine import InflightEngine
    from vlm_serving.generation.scheduling import EngineLimits

    return InflightEngine(generator, EngineLimits(**limits))


def _request(rng, prompt_tokens: int, max_tokens: int, vocabulary: int = 7000):
    from vlm_serving.generation.batch import GenerationRequest
    from vlm_serving.generation.sampling import SamplingParams

    return GenerationRequest(rng.integers(100, vocabulary, prompt_tokens).astype(np.int64),
                             SamplingParams(max_tokens=max_tokens, stream=True))


def _submit(engine, request, on_token=lambda: None) -> None:
    from vlm_serving.generation.engine import RequestSink

    def fail(exc: Exception):
        raise exc
    engine.submit(request, RequestSink(lambda update: on_token() if update.token_ids else None, fail))


def admission(count: int = 100) -> dict:
    from perf.engine import IdTokenizer
    from vlm_serving.generation.batch import BatchGenerator
    from vlm_serving.generation.loading import load_model

    generator = BatchGenerator("qwen2_5_vl", load_model(ROOT / "build" / "models" / "qwen2_5_vl"), IdTokenizer())
    rng = np.random.default_rng(0)
    lengths = [LONG_PROMPT if i % 10 == 0 else SHORT_PROMPT for i in range(count)]
    rng.shuffle(lengths)
    engine = _engine(generator, max_running=MAX_RUNNING, cache_tokens=BUDGET, prefill_chunk_tokens=2048,
                     max_waiting=count)
    for length in lengths:
        _submit(engine, _request(rng, length, ANSWER, vocabulary=400))  # the tiny vocabulary: 465 ids
    running_while_waiting, started = [], time.perf_counter()
    while not engine.idle:
        engine.step()
        if engine.stats.waiting:
            running_while_waiting.append(engine.stats.running)
    return {"mean_running": statistics.fmean(running_while_waiting), "peak_running": max(running_while_waiting),
            "steps": engine.stats.steps, "seconds": time.perf_counter() - started,
            "peak_cache_tokens": engine.stats.peak_cache_tokens}


def short_beside_long(long_prompt: int = BESIDE_LONG_PROMPT, rounds: int = 2) -> dict:
    from perf.engine import IdTokenizer
    from perf.real_width import model_at_real_width
    from vlm_serving.generation.batch import BatchGenerator

    generator = BatchGenerator("qwen2_5_vl", model_at_real_width(), IdTokenizer())

    def first_tokens(with_long: bool) -> list[float]:
        # A fresh engine per run: the shorts' prompts must not find the previous run's blocks cached.
        engine = _engine(generator, max_running=16, cache_tokens=BUDGET, prefill_chunk_tokens=512)
        rng = np.random.default_rng(1)
        shorts = [_request(rng, BESIDE_SHORT_PROMPT, 2) for _ in range(BESIDE_SHORTS)]
        firsts: list[float | None] = [None] * len(shorts)
        started = time.perf_counter()
        if with_long:
            _submit(engine, _request(rng, long_prompt, 2))

        def first(i):
            def record():
                firsts[i] = firsts[i] or time.perf_counter() - started
            return record
        for i, short in enumerate(shorts):
            _submit(engine, short, first(i))
        while None in firsts:  # the long prompt's own answer is not what is measured
            engine.step()
        return firsts

    first_tokens(False)  # warm-up: the first forwards allocate
    # Alternated, best of each: the shared machine's load moves between runs, not within one.
    runs = [(statistics.median(first_tokens(False)), statistics.median(first_tokens(True))) for _ in range(rounds)]
    return {"alone": min(alone for alone, _ in runs), "beside": min(beside for _, beside in runs)}


def measure(what: str, size: int, rounds: int = 1) -> dict:
    torch.set_num_threads(2)
    with torch.inference_mode():
        return admission(size) if what == "admission" else short_beside_long(size, rounds)


def rows(quick: bool = False) -> list[tuple]:
    """perf.bench's rows: (key, measure, measured, ratio, goal, unit, failed)."""
    engines = ("now",) if quick else ("now", "before")
    count, long_prompt = 100, (2048 if quick else BESIDE_LONG_PROMPT)
    admitted = {engine: run_measure("perf.mixed_lengths_row", engine, {"what": "admission", "size": count})
                for engine in engines}
    now = admitted["now"]
    over_budget = f"the cache held {now['peak_cache_tokens']} tokens, over its {BUDGET}" \
        if now["peak_cache_tokens"] > BUDGET else ""
    before = admitted.get("before")
    table = [("18g", f"rows running under one {BUDGET:,}-token cache budget while {count} requests wait, 90% "
              f"{SHORT_PROMPT}-token / 10% {LONG_PROMPT}-token prompts, {ANSWER} tokens each, paged / dense "
              f"(before issue 25), tiny Qwen2.5-VL; steps to serve them all {now['steps']}"
              + (f" / {before['steps']}" if before else " (dense not run with --quick)"),
              f"{now['mean_running']:.1f}" + (f" / {before['mean_running']:.1f} rows" if before else " rows"),
              now["mean_running"] / before["mean_running"] if before else None, ">= 2", "x",
              over_budget or ("" if before else "--quick runs today's engine only"))]
    beside = {engine: run_measure("perf.mixed_lengths_row", engine, {"what": "beside", "size": long_prompt,
                                                                     "rounds": 2 if engine == "now" else 1})
              for engine in engines}
    now, before = beside["now"], beside.get("before")
    table.append(("18h", f"time to first token of {BESIDE_SHORTS} {BESIDE_SHORT_PROMPT}-token prompts beside one "
                  f"{long_prompt}-token prompt / alone, Qwen2.5-VL-7B width, 2 layers"
                  + (f"; before issue 25: {before['beside'] * 1000:.0f} / {before['alone'] * 1000:.0f} ms, "
                     f"{before['beside'] / before['alone']:.1f}x" if before else ""),
                  f"{now['beside'] * 1000:.0f} / {now['alone'] * 1000:.0f} ms", now["beside"] / now["alone"],
                  "<= 1.5", "x", ""))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="today's engine only")
    args = parser.parse_args(argv)
    from perf.bench import Table

    Table().add(*rows(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
