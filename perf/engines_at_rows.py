"""`make bench-gpu` (issue 25): the engine now, the engine before the paged cache
(perf/engine_before.py) and plain transformers `generate`, at 1, 8, 32 and 64 rows: decode tokens/s
and time to first token, at the real Qwen2.5-VL-7B and Pixtral-12B configurations with random bf16
weights (perf/engine.py's `real_model`).

    python -m perf.engines_at_rows --config real --device cuda     # on one H100: within 8 minutes
    .venv/bin/python -m perf.engines_at_rows --rows 1 8            # the tiny checkpoints on the CPU

Each point submits ROWS requests of PROMPT random prompt tokens at once, each asking for NEW
tokens (greedy), and times every token: time to first token is the median over the rows; decode
tokens/s counts the tokens after each row's first, over the time from the last first token to the
last token (prefill apart). `generate` runs the same prompts as one batch of equal lengths (no
padding), min_new_tokens = max_new_tokens = NEW; its time to first token is a `generate` of one
token over the same batch. Each engine runs in its own process (the old one from its git tree).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from perf.engine_before import ROOT, run_measure

ROWS = (1, 8, 32, 64)
FAMILIES = ("qwen2_5_vl", "pixtral")


def _load(family: str, config: str, device: str):
    from perf.engine import IdTokenizer, real_model
    from vlm_serving.generation.batch import BatchGenerator
    from vlm_serving.generation.loading import load_model

    if config == "real":
        model, tokenizer = real_model(family, device)
    else:
        model, tokenizer = load_model(ROOT / "build" / "models" / family, "none", device), IdTokenizer()
    return BatchGenerator(family, model, tokenizer, device)


def _prompts(generator, rows: int, prompt: int) -> np.ndarray:
    vocabulary = int(generator.model.config.get_text_config().vocab_size)
    special = {generator.image_token_id, *generator.eos_ids, generator.pad_id}
    ids = np.random.default_rng(rows).integers(100, min(vocabulary, 30000), (rows, prompt))
    ids[np.isin(ids, list(special))] = 100
    return ids.astype(np.int64)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _engine_point(generator, device: str, rows: int, prompt: int, new: int) -> dict:
    from vlm_serving.generation.batch import GenerationRequest
    from vlm_serving.generation.engine import InflightEngine, RequestSink
    from vlm_serving.generation.sampling import SamplingParams
    from vlm_serving.generation.scheduling import EngineLimits

    limits = EngineLimits(max_running=max(ROWS), cache_tokens=max(ROWS) * (prompt + new) * 2,
                          prefill_chunk_tokens=512 if device == "cpu" else 4096, max_waiting=max(ROWS))
    engine = InflightEngine(generator, limits)
    times: list[list[float]] = [[] for _ in range(rows)]

    def sink(row: int) -> RequestSink:
        def update(update):
            times[row].extend([time.perf_counter()] * len(update.token_ids))

        def fail(exc: Exception):
            raise exc
        return RequestSink(update, fail)
    started = time.perf_counter()
    for row, ids in enumerate(_prompts(generator, rows, prompt)):
        engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=new, stream=True)), sink(row))
    while not engine.idle:
        engine.step()
    _sync(device)
    last_first = max(row[0] for row in times)
    after_first = sum(len(row) - 1 for row in times)
    return {"ttft": statistics.median(row[0] - started for row in times),
            "tokens_per_s": after_first / max(max(row[-1] for row in times) - last_first, 1e-9)}


def _generate_point(generator, device: str, rows: int, prompt: int, new: int) -> dict:
    ids = torch.as_tensor(_prompts(generator, rows, prompt), device=device)
    mask = torch.ones_like(ids)

    def run(tokens: int) -> float:
        _sync(device)
        started = time.perf_counter()
        generator.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False, pad_token_id=generator.pad_id)
        _sync(device)
        return time.perf_counter() - started
    first, whole = run(1), run(new)
    return {"ttft": first, "tokens_per_s": rows * (new - 1) / max(whole - first, 1e-9)}


def measure(family: str, config: str, device: str, rows: list[int], prompt: int, new: int,
            with_generate: bool) -> dict:
    """{"engine": {rows: point}, "generate": {rows: point}} for the engine this process imports."""
    if device == "cpu":  # the 2-core machine's figures; on a GPU host torch keeps its own count
        torch.set_num_threads(2)
    torch.manual_seed(0)
    results: dict[str, dict] = {"engine": {}, "generate": {}}
    with torch.inference_mode():
        generator = _load(family, config, device)
        _engine_point(generator, device, 1, prompt, 4)  # warm-up: first allocations and kernels
        for count in rows:
            results["engine"][count] = _engine_point(generator, device, count, prompt, new)
            if with_generate:
                results["generate"][count] = _generate_point(generator, device, count, prompt, new)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--family", choices=FAMILIES, action="append", help="one family (repeatable; default both)")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per row")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"perf.engines_at_rows --config {args.config} --device {args.device} ({device}, torch {torch.__version__}): "
          f"{args.prompt}-token prompts, {args.new} tokens each, greedy", flush=True)
    print("| family | rows | decode tokens/s: now / before / generate | time to first token, ms: now / before / "
          "generate | now / before | now / generate |\n| --- | --- | --- | --- | --- | --- |", flush=True)
    for family in args.family or FAMILIES:
        arguments = {"family": family, "config": args.config, "device": args.device, "rows": args.rows,
                     "prompt": args.prompt, "new": args.new}
        now = run_measure("perf.engines_at_rows", "now", {**arguments, "with_generate": True})
        before = run_measure("perf.engines_at_rows", "before", {**arguments, "with_generate": False})
        for count in map(str, args.rows):  # JSON keys
            points = (now["engine"][count], before["engine"][count], now["generate"][count])
            rates = [point["tokens_per_s"] for point in points]
            firsts = [point["ttft"] * 1000 for point in points]
            print(f"| {family} | {count} | {' / '.join(f'{rate:.0f}' for rate in rates)} | "
                  f"{' / '.join(f'{first:.0f}' for first in firsts)} | "
                  f"{rates[0] / rates[1]:.2f}x | {rates[0] / rates[2]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
