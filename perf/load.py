"""An asyncio load generator for the public API and, with the same requests, for Triton directly.

    .venv/bin/python -m perf.load --target gateway --address localhost:50051 --model qwen2.5-vl \
        --concurrency 16 --requests 256 [--stream] [--max-tokens 32]

Reports throughput and p50/p95/p99 latency (nearest rank), for streams the time to the first
text, and every failed request by status code. Closed loop: each of `concurrency` workers sends its
next request when its last one ends, so latencies are those at the load the system sustains, not
at a fixed arrival rate.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway.triton_backend import TritonBackend
from perf.stats import percentile
from perf.workload import SHORT_TOKENS, WorkItem, messages, workload
from vlm_serving.generation.sampling import SamplingParams


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    first_text: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    errors_by_code: Counter = field(default_factory=Counter)
    # Model "auto": answers by (route reason, answering family).
    routes: Counter = field(default_factory=Counter)
    # Latencies of the requests that asked for a short answer (mixed workloads).
    short_latencies: list[float] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        return percentile(self.latencies if values is None else values, q)

    def summary(self) -> str:
        text = (f"{self.throughput:.1f} req/s, p50 {self.percentile(50) * 1000:.1f} ms, "
                f"p95 {self.percentile(95) * 1000:.1f} ms, p99 {self.percentile(99) * 1000:.1f} ms, "
                f"errors {self.errors}" + (f" {dict(self.errors_by_code)}" if self.errors else ""))
        if self.first_text:
            text += f", first text p50 {self.percentile(50, self.first_text) * 1000:.1f} ms"
        return text


class GatewayTarget:
    def __init__(self, address: str, api_key: str, model: str, credentials: grpc.ChannelCredentials | None = None):
        self.channel = (grpc.aio.secure_channel(address, credentials) if credentials
                        else grpc.aio.insecure_channel(address))
        self.stub = vlm_pb2_grpc.VisionLanguageServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)
        self.model = model

    async def call(self, item: WorkItem, max_tokens: int, stream: bool) -> tuple[float | None, int]:
        """Send one request; (time to its first text for streams else None, completion tokens)."""
        parts = ([vlm_pb2.Part(image=vlm_pb2.Image(data=item.image))] if item.image else [])
        parts.append(vlm_pb2.Part(text=item.prompt))
        request = vlm_pb2.GenerateRequest(model=self.model, messages=[vlm_pb2.Message(role="user", parts=parts)],
                                          config=vlm_pb2.GenerationConfig(max_tokens=max_tokens))
        if not stream:
            answer = await self.stub.Generate(request, metadata=self.metadata, timeout=300)
            return None, answer.usage.completion_tokens
        started, first, tokens = time.perf_counter(), None, 0
        async for message in self.stub.GenerateStream(request, metadata=self.metadata, timeout=300):
            if first is None and message.text:
                first = time.perf_counter() - started
            tokens = message.usage.completion_tokens or tokens
        return first, tokens

    async def close(self) -> None:
        await self.channel.close()


class HttpTarget:
    """The same requests through the gateway's OpenAI-compatible HTTP API (httpx, keep-alive)."""

    def __init__(self, base_url: str, api_key: str, model: str):
        import httpx2

        self.client = httpx2.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                         timeout=300, limits=httpx2.Limits(max_connections=64))
        self.model = model
        # Each request's body encoded once (base64 and JSON of a large image cost the load generator,
        # which shares the machine, more than the gateway's own work; gRPC's bytes need no encoding).
        self.bodies: dict[tuple[int, int], bytes] = {}

    def body(self, item: WorkItem, max_tokens: int) -> bytes:
        import base64
        import json

        key = (id(item), max_tokens)
        if key not in self.bodies:
            content = [{"type": "text", "text": item.prompt}]
            if item.image:
                url = "data:image/png;base64," + base64.b64encode(item.image).decode()
                content.insert(0, {"type": "image_url", "image_url": {"url": url}})
            self.bodies[key] = json.dumps({"model": self.model, "max_tokens": max_tokens,
                                           "messages": [{"role": "user", "content": content}]}).encode()
        return self.bodies[key]

    async def call(self, item: WorkItem, max_tokens: int, stream: bool) -> tuple[float | None, int]:
        if stream:
            raise NotImplementedError("HttpTarget measures unary calls")
        response = await self.client.post("/v1/chat/completions", content=self.body(item, max_tokens),
                                          headers={"Content-Type": "application/json"})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return None, response.json()["usage"]["completion_tokens"]

    async def close(self) -> None:
        await self.client.aclose()


class TritonTarget:
    """The same requests straight to the ensemble, sent the way the gateway sends them (its
    Triton backend: one shared stream), so the difference to GatewayTarget is the public-API hop."""

    def __init__(self, url: str, ensemble: str, routing: dict | None = None):
        self.backend = TritonBackend(url)
        self.ensemble = ensemble
        self.routing = routing  # model "auto": confidence_threshold, fallback
        self.ids = itertools.count()
        # Model "auto": how often each route reason and answering family came back.
        self.routes: Counter = Counter()

    async def call(self, item: WorkItem, max_tokens: int, stream: bool) -> tuple[float | None, int]:
        params = SamplingParams(max_tokens=max_tokens, stream=stream)
        started, first, tokens = time.perf_counter(), None, 0
        async for chunk in self.backend.generate(self.ensemble, messages(item), [item.image] if item.image else [],
                                                 params, f"load-{next(self.ids)}", routing=self.routing):
            if first is None and chunk.text:
                first = time.perf_counter() - started
            tokens = chunk.completion_tokens or tokens
            if chunk.finished and chunk.route:
                self.routes[chunk.route["reason"], chunk.route["family"]] += 1
        return (first if stream else None), tokens

    async def close(self) -> None:
        await self.backend.close()


async def _measured_call(target, item: WorkItem, max_tokens: int, stream: bool, result: LoadResult) -> None:
    """One request, its latency, tokens and time to first text (or its error) into `result`."""
    tokens_asked = item.max_tokens or max_tokens
    started = time.perf_counter()
    try:
        first, tokens = await target.call(item, tokens_asked, stream)
    except grpc.aio.AioRpcError as error:
        result.errors_by_code[error.code().name] += 1
        return
    except Exception as error:  # Triton's own errors on the direct path, say
        result.errors_by_code[type(error).__name__] += 1
        return
    latency = time.perf_counter() - started
    result.latencies.append(latency)
    result.completion_tokens.append(tokens)
    if tokens_asked <= SHORT_TOKENS:
        result.short_latencies.append(latency)
    if first is not None:
        result.first_text.append(first)


async def run_load(target, items: list[WorkItem], concurrency: int, requests: int, max_tokens: int,
                   stream: bool = False, warmup: int = 4) -> LoadResult:
    """Closed loop: `concurrency` workers, each sending its next request when its last one ends."""
    for item in items[:warmup]:
        await target.call(item, item.max_tokens or max_tokens, stream)
    result = LoadResult(requests=requests, seconds=0.0)
    counter = iter(range(requests))

    async def worker():
        for i in counter:
            await _measured_call(target, items[i % len(items)], max_tokens, stream, result)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    result.routes = getattr(target, "routes", Counter())
    return result


async def run_open_loop(target, items: list[WorkItem], rate: float, requests: int, max_tokens: int = 16,
                        stream: bool = True, seed: int = 0) -> LoadResult:
    """Open loop: requests arrive as a Poisson process of `rate` per second (all at once when
    `rate` is infinite), whatever the answers before them are doing; latencies include queueing."""
    arrivals = random.Random(seed)
    result = LoadResult(requests=requests, seconds=0.0)
    started, due, calls = time.perf_counter(), 0.0, []
    for i in range(requests):
        due += 0.0 if math.isinf(rate) else arrivals.expovariate(rate)
        await asyncio.sleep(max(0.0, started + due - time.perf_counter()))
        calls.append(asyncio.ensure_future(_measured_call(target, items[i % len(items)], max_tokens, stream, result)))
    await asyncio.gather(*calls)
    result.seconds = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["gateway", "triton"], default="gateway")
    parser.add_argument("--address", default="localhost:50051", help="gateway host:port, or Triton gRPC for --target triton")
    parser.add_argument("--api-key", default=os.environ.get("VLM_API_KEY", "dev-local-key"))
    parser.add_argument("--model", default="qwen2.5-vl", help="public model name (gateway) or ensemble (triton)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--text-only", action="store_true")
    parser.add_argument("--batch-stats", action="store_true",
                        help="with --target triton: executions of <ensemble>_generate by batch size during the run")
    args = parser.parse_args()

    def batch_counts() -> dict[int, int]:
        import tritonclient.grpc as triton_grpc

        stats = triton_grpc.InferenceServerClient(args.address).get_inference_statistics(
            f"{args.model}_generate", as_json=True)
        return {int(b["batch_size"]): int(b["compute_infer"]["count"])
                for b in stats["model_stats"][0].get("batch_stats", [])}

    async def go():
        target = (GatewayTarget(args.address, args.api_key, args.model) if args.target == "gateway"
                  else TritonTarget(args.address, args.model))
        try:
            result = await run_load(target, workload(with_images=not args.text_only), args.concurrency,
                                    args.requests, args.max_tokens, args.stream)
        finally:
            await target.close()
        print(result.summary())

    before = batch_counts() if args.batch_stats else {}
    asyncio.run(go())
    if args.batch_stats:
        after = batch_counts()
        grown = {size: after[size] - before.get(size, 0) for size in sorted(after) if after[size] > before.get(size, 0)}
        print("generate executions by batch size (size: count): " + ", ".join(f"{k}: {v}" for k, v in grown.items()))


if __name__ == "__main__":
    main()
