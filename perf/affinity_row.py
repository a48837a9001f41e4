"""Row 22 of `make bench` (also alone): cache-aware routing (VLM_ROUTING=affinity) against least-loaded
routing, one gateway each over the same three Triton servers (Qwen2.5-VL's pipeline), on two workloads:

- chats: conversations about one image each, four turns, each turn the whole conversation so far
  (the image, the questions, the answers) plus a new question after a think time (mean 0.5 s), all
  conversations at once;
- documents: five questions about each document image, asked by six callers working through the
  questions document by document (a batch job).

For each: the encoder cache's hit rate and the prompt tokens the engine's prefix cache supplied, summed
over the three servers from their own metrics endpoints (`vlm_encoder_cache_*`, `vlm_engine_cached_tokens_total`),
and the requests' p99 latency. Both gateways run in alternation, each round on images of its own (the
servers' caches hold what earlier rounds sent), and a mode's figures are summed over its rounds.

    .venv/bin/python -m perf.affinity_row [--quick]

All three servers share this machine's cores; latencies there are those of a CPU-bound stack.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import re
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from perf.bench import BENCH, KEY, free_port, launch, print_table, progress, repository, run_on_bench_loop
from perf.stats import percentile
from vlm_serving.deploy.stack import GatewayProcess, stop_on_signals
from vlm_serving.deploy.triton_server import TritonServer, stop_all
from vlm_serving.pipelines import pipeline

MODES = ("affinity", "least_loaded")
CONCURRENCY, MAX_TOKENS = 6, 16
THINK_S = 0.5  # a chat's mean pause between an answer and the next question
CHAT_QUESTIONS = ["What is in this picture?", "Which colours dominate it?", "Is there any text in it?",
                  "Describe its left half."]
DOCUMENT_QUESTIONS = ["What kind of document is this?", "What is its title?", "Summarise it in one line.",
                      "Which numbers does it show?", "Who is it addressed to?"]
GOAL_HIT_RATE, GOAL_P99 = ">= 2", "<= 1"
# Three servers on this machine's cores: one math thread each (row 14: with the libraries' default of one
# per core each, the servers mostly wait for one another's threads).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Caches:
    """The servers' cache counters, summed over them (from Triton's metrics endpoints)."""

    encoder_hits: float = 0.0
    encoder_misses: float = 0.0
    cached_tokens: float = 0.0
    prefill_tokens: float = 0.0

    NAMES = {"encoder_hits": "vlm_encoder_cache_hits_total", "encoder_misses": "vlm_encoder_cache_misses_total",
             "cached_tokens": "vlm_engine_cached_tokens_total", "prefill_tokens": "vlm_engine_prefill_tokens_total"}

    @classmethod
    def read(cls, servers: list[TritonServer]) -> "Caches":
        totals = cls()
        for server in servers:
            with urllib.request.urlopen(f"http://{server.address}:{server.metrics_port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            for attribute, name in cls.NAMES.items():
                values = re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
                setattr(totals, attribute, getattr(totals, attribute) + sum(map(float, values)))
        return totals

    @classmethod
    def settled(cls, servers: list[TritonServer]) -> "Caches":
        """The counters once they stop moving: the engine reports at most once a second, and when idle."""
        last = cls.read(servers)
        while True:
            time.sleep(1.2)
            now = cls.read(servers)
            if now == last:
                return now
            last = now

    def __sub__(self, other: "Caches") -> "Caches":
        return Caches(*(getattr(self, a) - getattr(other, a) for a in self.NAMES))

    def __add__(self, other: "Caches") -> "Caches":
        return Caches(*(getattr(self, a) + getattr(other, a) for a in self.NAMES))

    @property
    def hit_rate(self) -> float:
        looked_up = self.encoder_hits + self.encoder_misses
        return self.encoder_hits / looked_up if looked_up else 0.0


@dataclass
class Outcome:
    caches: Caches = field(default_factory=Caches)
    latencies: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def user(text: str, image: bytes | None = None) -> vlm_pb2.Message:
    parts = [vlm_pb2.Part(image=vlm_pb2.Image(data=image))] if image else []
    return vlm_pb2.Message(role="user", parts=[*parts, vlm_pb2.Part(text=text)])


class Caller:
    """Timed Generate calls to one gateway, failures collected rather than raised."""

    def __init__(self, address: str, outcome: Outcome):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = vlm_pb2_grpc.VisionLanguageServiceStub(self.channel)
        self.outcome = outcome

    async def ask(self, messages: list[vlm_pb2.Message]) -> str:
        request = vlm_pb2.GenerateRequest(model="qwen2.5-vl", messages=messages,
                                          config=vlm_pb2.GenerationConfig(max_tokens=MAX_TOKENS))
        started = time.perf_counter()
        try:
            answer = await self.stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=300)
        except grpc.aio.AioRpcError as error:
            self.outcome.failed.append(error.code().name)
            return ""
        self.outcome.latencies.append(time.perf_counter() - started)
        return answer.text


def image(seed: int) -> bytes:
    """A 640x480 JPEG of coloured blocks drawn from `seed`: images of different seeds differ at the
    model's resolution too (noise alone averages out when the image is resized down, and equal
    pictures would hit each other's cache entries)."""
    rng = np.random.default_rng(seed)
    blocks = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize((640, 480), Image.NEAREST)
    buffer = io.BytesIO()
    blocks.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def chats(caller: Caller, count: int, seed: int) -> None:
    """`count` conversations at once, each turn after its caller's think time (exponential, mean
    THINK_S): the turns of all conversations interleave, as people's do. (Without think time, a closed
    loop sends each next turn the moment its server frees a slot, where least-loaded routing then
    sends it too: an affinity no real traffic has.)"""
    async def conversation(i: int) -> None:
        think = random.Random(seed + i)
        messages = [user(CHAT_QUESTIONS[0], image(seed + i))]
        for question in CHAT_QUESTIONS[1:] + [None]:
            await asyncio.sleep(think.expovariate(1 / THINK_S))
            answer = await caller.ask(messages)
            if question is not None:
                messages += [vlm_pb2.Message(role="assistant", parts=[vlm_pb2.Part(text=answer or "-")]), user(question)]

    await asyncio.gather(*(conversation(i) for i in range(count)))


async def documents(caller: Caller, count: int, seed: int) -> None:
    documents = [image(seed + i) for i in range(count)]
    questions = [[user(question, document)] for document in documents for question in DOCUMENT_QUESTIONS]
    await at_most(CONCURRENCY, [lambda q=q: caller.ask(q) for q in questions])


async def at_most(concurrency: int, jobs: list[Callable[[], Awaitable]]) -> None:
    """The jobs in order, `concurrency` at a time (each worker takes the next when its last ends)."""
    queue = iter(jobs)

    async def worker():
        for job in queue:
            await job()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def start_servers(servers: list) -> list[TritonServer]:
    """Three Triton servers, Qwen2.5-VL's pipeline only, started together."""
    started = []
    for name in ("affinity_a", "affinity_b", "affinity_c"):
        progress(f"starting Triton '{name}'")
        server = TritonServer(repository=repository(name), http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port(), log_path=BENCH / f"{name}.log",
                              load_models=(*pipeline("qwen2_5_vl"), "cancel"), extra_env=ONE_THREAD)
        launch(server, servers)
        started.append(server)
    for server in started:
        server.wait_ready(300)
    return started


def start_gateway(tritons: list[TritonServer], mode: str, servers: list, load_factor: float | None) -> GatewayProcess:
    factor = {"VLM_AFFINITY_LOAD_FACTOR": str(load_factor)} if load_factor else {}
    gateway = GatewayProcess(triton_url=",".join(t.grpc_url for t in tritons), address=f"127.0.0.1:{free_port()}",
                             metrics_port=free_port(), log_path=BENCH / f"gateway_{mode}.log",
                             extra_env={"VLM_API_KEYS": KEY, "VLM_ROUTING": mode, **factor})
    launch(gateway, servers)
    gateway.wait_serving(60)
    return gateway


async def warm_up(caller: Caller, count: int, seed: int) -> None:
    """Requests one after another, each about an image of its own: idle servers take turns, so each
    server's pipeline and each gateway's connections have served before anything is timed."""
    for i in range(count):
        await caller.ask([user("What is in this picture?", image(seed + i))])


async def run(workload, address: str, outcome: Outcome, count: int, seed: int) -> None:
    caller = Caller(address, outcome)  # its channel made on the loop that runs it
    try:
        await workload(caller, count, seed)
    finally:
        await caller.channel.close()


def measure(gateways: dict[str, GatewayProcess], tritons: list[TritonServer], workload, count: int,
            rounds: int, seed: int) -> dict[str, Outcome]:
    """Each mode `rounds` times, in alternation, each run on images no run sent before (seeds `seed` +
    1000 per run: the workloads' seeds lie 100,000 apart)."""
    outcomes = {mode: Outcome() for mode in MODES}
    for round_ in range(rounds):
        for k, mode in enumerate(MODES):
            before = Caches.settled(tritons)
            run_on_bench_loop(run(workload, gateways[mode].address, outcomes[mode], count,
                                  seed + 1000 * (2 * round_ + k)))
            outcomes[mode].caches += Caches.settled(tritons) - before
    return outcomes


def rows_of(letters: str, label: str, outcomes: dict[str, Outcome], requests: int, images: int) -> list[tuple]:
    """Rows 22<letters>: hit rate, prefix-cached tokens and p99 latency, affinity / least loaded. The
    best hit rate possible: one miss per image, (requests - images) / requests. (Requests in one embed
    batch that share an unseen image each count a miss, though it is encoded once.)"""
    affinity, least = outcomes["affinity"], outcomes["least_loaded"]
    failed = ", ".join(f"{mode}: {len(o.failed)} failed ({', '.join(sorted(set(o.failed)))})"
                       for mode, o in outcomes.items() if o.failed)
    a, b = affinity.caches, least.caches
    p99 = [percentile(o.latencies, 99) for o in (affinity, least)]
    return [
        (f"22{letters[0]}", f"{label}: encoder-cache hit rate, affinity / least loaded (3 servers, "
         f"{requests} requests a mode)", f"{a.hit_rate:.2f} / {b.hit_rate:.2f} (best possible {1 - images / requests:.2f}: {images} images; "
         f"misses {a.encoder_misses:.0f} / {b.encoder_misses:.0f})", a.hit_rate / b.hit_rate if b.hit_rate else float("inf"), GOAL_HIT_RATE, "x",
         failed),
        (f"22{letters[1]}", f"{label}: prompt tokens from the prefix cache, affinity / least loaded",
         f"{a.cached_tokens:.0f} / {b.cached_tokens:.0f} tokens (of {a.cached_tokens + a.prefill_tokens:.0f} / "
         f"{b.cached_tokens + b.prefill_tokens:.0f})",
         a.cached_tokens / b.cached_tokens if b.cached_tokens else float("inf"), "reported", "x", failed),
        (f"22{letters[2]}", f"{label}: p99 latency, affinity / least loaded, {MAX_TOKENS} tokens",
         f"{p99[0] * 1000:.0f} / {p99[1] * 1000:.0f} ms", p99[0] / p99[1], GOAL_P99, "x", failed),
    ]


def rows(quick: bool = False, load_factor: float | None = None) -> list[tuple]:
    """Rows 22a-f, on three servers and two gateways of their own (stopped after, signals too)."""
    own: list = []
    try:
        tritons = start_servers(own)
        gateways = {mode: start_gateway(tritons, mode, own, load_factor) for mode in MODES}
        rounds, chat_count, document_count = (1, 6, 6) if quick else (2, 12, 12)
        progress("row 22: warming up both gateways and the three servers")
        for k, mode in enumerate(MODES):
            run_on_bench_loop(run(warm_up, gateways[mode].address, Outcome(), 6, seed=300_000 + 100 * k))
        progress("row 22a-c: chats, affinity and least-loaded routing in alternation")
        table = rows_of("abc", f"{chat_count} chats of 4 turns about an image at once",
                        measure(gateways, tritons, chats, chat_count, rounds, seed=100_000),
                        chat_count * len(CHAT_QUESTIONS) * rounds, chat_count * rounds)
        progress("row 22d-f: five questions per document, in alternation")
        return table + rows_of("def", f"5 questions per document, {CONCURRENCY} callers",
                               measure(gateways, tritons, documents, document_count, rounds, seed=200_000),
                               document_count * len(DOCUMENT_QUESTIONS) * rounds, document_count * rounds)
    finally:
        stop_all(reversed(own))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer conversations and documents, one round")
    parser.add_argument("--load-factor", type=float, help="VLM_AFFINITY_LOAD_FACTOR (default: the gateway's)")
    args = parser.parse_args(argv)
    stop_on_signals()
    BENCH.mkdir(parents=True, exist_ok=True)
    print_table(rows(args.quick, args.load_factor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
