"""make bench rows 10 and 11: scheduling on the whole stack (gateway -> Triton), tiny Qwen2.5-VL.

    .venv/bin/python -m perf.inflight [--quick]

10. the same mixed workload (perf/workload.py: 4 in 5 answers of 16 tokens, 1 in 5 of 128, every
    other request with an image) against two stacks, one per scheduler (`render --scheduler`):
    a. throughput at saturation (every request sent at once), in flight / static;
    b. open loop, Poisson arrivals at 40%, 70% and 100% of static's saturation rate: p99 latency of
       the short requests, in flight / static (the ratio at 70%);
    c. p99 time to first text at 70%, in flight / static.
11. the peer the seeds use: the whole stack (in flight) at 16 concurrent callers / a plain transformers
    loop that runs the same requests through `generate` in fixed batches of 4 (the seeds' batch loop:
    the processor, left padding, greedy, the batch's largest max_new_tokens), same checkpoint, same
    images, same machine: requests/s.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time

import torch
from PIL import Image

from perf.bench import BENCH, KEY, failures, free_port, launch, load, progress, run_on_bench_loop, triton
from perf.load import GatewayTarget, run_open_loop
from perf.workload import SHORT_TOKENS, mixed_workload, messages
from vlm_serving.deploy.stack import GatewayProcess, stop_on_signals
from vlm_serving.deploy.triton_server import BUILD, stop_all

RATES = (0.4, 0.7, 1.0)


def run_open(gateway: GatewayProcess, items, rate: float, requests: int, seed: int = 0):
    async def go():
        target = GatewayTarget(gateway.address, KEY, "qwen2.5-vl")
        try:
            for item in items[:4]:  # warm-up
                await target.call(item, item.max_tokens, True)
            return await run_open_loop(target, items, rate, requests, seed=seed)
        finally:
            await target.close()

    return run_on_bench_loop(go())


def seeds_batch_loop(checkpoint, items, batch_size: int = 4) -> float:
    """Seconds for the seeds' loop over `items`: processor -> `generate` in fixed batches."""
    from transformers import AutoModelForImageTextToText

    from tests.reference import qwen_processor

    processor = qwen_processor(checkpoint)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
    started = time.perf_counter()
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        texts = [processor.apply_chat_template(messages(item), tokenize=False, add_generation_prompt=True) for item in batch]
        images = [Image.open(io.BytesIO(item.image)).convert("RGB") for item in batch if item.image]
        inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max(item.max_tokens for item in batch), do_sample=False)
        processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return time.perf_counter() - started


def rows(scale: float = 1.0) -> list[tuple]:
    """The rows as perf.bench prints them: (key, measure, measured, ratio, goal, unit, failed)."""
    n = lambda count: max(16, int(count * scale))  # noqa: E731
    items = mixed_workload(20)
    servers, table = [], []
    try:
        stacks = {}
        for scheduler in ("static", "inflight"):
            server = triton(f"scheduler_{scheduler}", servers, scheduler=scheduler)
            gateway = GatewayProcess(triton_url=server.grpc_url, address=f"127.0.0.1:{free_port()}",
                                     metrics_port=free_port(), log_path=BENCH / f"gateway_{scheduler}.log",
                                     extra_env={"VLM_API_KEYS": KEY})
            launch(gateway, servers)
            gateway.wait_serving(60)
            stacks[scheduler] = gateway

        saturated = {}
        for scheduler in ("static", "inflight"):
            progress(f"row 10a: saturation, {scheduler}")
            saturated[scheduler] = run_open(stacks[scheduler], items, math.inf, n(60))
        static_rate = saturated["static"].throughput
        failed = failures(*saturated.values())
        table.append(("10a", "in flight / static: throughput at saturation (all sent at once), mixed workload",
                      f"{saturated['inflight'].throughput:.2f} / {static_rate:.2f} req/s",
                      None if failed else saturated["inflight"].throughput / static_rate, ">= 1.5", "x", failed))

        at_rate = {}
        for share in RATES:
            for scheduler in ("static", "inflight"):
                progress(f"row 10b: open loop at {share:.0%} of static's saturation, {scheduler}")
                at_rate[share, scheduler] = run_open(stacks[scheduler], items, share * static_rate, n(60), seed=7)
        failed = failures(*at_rate.values())
        p99 = {key: result.percentile(99, result.short_latencies) for key, result in at_rate.items()}
        table.append(("10b", "in flight / static: p99 latency of the short requests, open loop (Poisson) at 70% of "
                      f"static's saturation ({0.7 * static_rate:.2f} req/s); at 40% / 70% / 100%: "
                      + " ; ".join(f"{p99[share, 'inflight'] * 1000:.0f}/{p99[share, 'static'] * 1000:.0f}" for share in RATES)
                      + " ms", f"{p99[0.7, 'inflight'] * 1000:.0f} / {p99[0.7, 'static'] * 1000:.0f} ms",
                      None if failed else p99[0.7, "inflight"] / p99[0.7, "static"], "<= 0.3", "x", failed))
        first = {s: at_rate[0.7, s].percentile(99, at_rate[0.7, s].first_text) for s in ("static", "inflight")}
        table.append(("10c", "in flight / static: p99 time to first text, same load (70%)",
                      f"{first['inflight'] * 1000:.0f} / {first['static'] * 1000:.0f} ms",
                      None if failed else first["inflight"] / first["static"], "lower", "x", failed))

        progress("row 11: the whole stack against the seeds' batch loop")
        peer_items = [items[i % len(items)] for i in range(n(48))]
        stack = load(lambda: GatewayTarget(stacks["inflight"].address, KEY, "qwen2.5-vl"), peer_items, 16,
                     len(peer_items), SHORT_TOKENS)
        loop_s = seeds_batch_loop(BUILD / "models" / "qwen2_5_vl", peer_items)
        loop_rate = len(peer_items) / loop_s
        failed = failures(stack)
        table.append(("11", "whole stack (gateway -> Triton, in flight), 16 callers / the seeds' loop (transformers "
                      "generate in fixed batches of 4), same requests", f"{stack.throughput:.2f} / {loop_rate:.2f} req/s",
                      None if failed else stack.throughput / loop_rate, ">= 2", "x", failed))  # issue 25's goal
    finally:
        stop_all(reversed(servers))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, noisier)")
    args = parser.parse_args(argv)
    stop_on_signals()
    BENCH.mkdir(parents=True, exist_ok=True)
    print("\n| # | measure | measured | ratio | goal |")
    print("| --- | --- | --- | --- | --- |")
    for key, name, measured, ratio, goal, unit, failed in rows(0.35 if args.quick else 1.0):
        print(f"| {key} | {name} | {measured} | {'not a result: ' + failed if failed else f'{ratio:.2f}x'} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
