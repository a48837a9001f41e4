"""Latency per family and the batch sizes Triton forms under concurrency, against a running server.

    make up && .venv/bin/python perf/serving_core.py [--url 127.0.0.1:8001] [--requests 20]

Prints one table per run; results go to perf/RESULTS.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import tritonclient.grpc as grpcclient

from tests.conftest import encode, picture
from vlm_serving.ensemble_client import generate, user_message


def batch_counts(url: str, model: str) -> dict[int, int]:
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["model_stats"][0].get("batch_stats", [])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    image = encode(picture(320, 240, seed=1), "JPEG")
    messages = user_message("What is in this picture?", 1)
    rows = []
    for family in ("qwen2_5_vl", "pixtral"):
        call = lambda **kw: generate(args.url, family, messages, [image], max_tokens=args.max_tokens, **kw)
        call()  # warm-up
        latencies, first_delta = [], []
        for _ in range(args.requests):
            start = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - start)
            start, seen = time.perf_counter(), []
            call(stream=True, on_delta=lambda d: seen.append(time.perf_counter() - start))
            first_delta.append(seen[0] if seen else float("nan"))
        before = batch_counts(args.url, f"{family}_generate")
        start = time.perf_counter()
        total = args.concurrency * 4
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda _: call(), range(total)))
        elapsed = time.perf_counter() - start
        after = batch_counts(args.url, f"{family}_generate")
        grown = {size: after[size] - before.get(size, 0) for size in sorted(after) if after[size] > before.get(size, 0)}
        rows.append((family, statistics.median(latencies), max(latencies), statistics.median(first_delta),
                     total / elapsed, grown))
    print(f"| ensemble | p50 latency ({args.max_tokens} tokens) | max | p50 first delta (stream) "
          f"| req/s at concurrency {args.concurrency} | generate batches seen (size: count) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for family, p50, worst, ttft, throughput, grown in rows:
        sizes = ", ".join(f"{size}: {count}" for size, count in grown.items())
        print(f"| {family} | {p50 * 1000:.0f} ms | {worst * 1000:.0f} ms | {ttft * 1000:.0f} ms | {throughput:.1f} | {sizes} |")


if __name__ == "__main__":
    main()
