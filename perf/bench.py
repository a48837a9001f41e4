"""make bench: start the stack, measure, print one table of ratios measured in this run.

    .venv/bin/python -m perf.bench [--quick] [--only GROUP ...]

1. gateway throughput / direct Triton throughput (same ensemble, same requests, concurrency 16),
   and the gateway's added p50 latency on a trivial request (text only, one token); 1c, 1d: the same through
   a second gateway with mutual TLS on its listener and a named key with quotas (from a key file);
2. batching on (in flight, the default) / off (static, max batch 1), direct to Triton, concurrency 16;
3. preprocessing images/s, ours / transformers' own image processors, on the same pictures
   (outputs equal to 1e-5, else the row is marked);
4. streaming time to first text / whole-response time at 64 output tokens;
5. vision encoder images/s, ONNX Runtime / the transformers tower (fp32 outputs equal to 1e-4, else
   marked; the int8 row is speed over unequal outputs) (perf/encoders.py; 7: the int8 encoder's
   token agreement with fp32, reported);
6. a repeated image's request latency, cache hit / miss (tiny tower; a 4x1280 tower serving);
8. model auto: its overhead over Qwen2.5-VL directly (fallback off, photos), what a fallback costs,
   and what holding Qwen's answer for the fallback costs a stream's first text;
9. the image-kind classifier: time per megapixel and held-out accuracy (perf/image_kinds.py);
10, 11. in-flight against static batching, and the whole stack against the seeds' batch loop
   (perf/inflight.py; the engine alone, also on a GPU: perf/engine.py);
12. constrained decoding: tokens/s with a JSON Schema against free text at batch 1 and 16, and
   a typical schema's compile time cached and uncached (perf/engine.py);
13. the OpenAI-compatible HTTP API's throughput / gRPC's, through the same gateway, c=16;
14. a gateway over two Triton servers / over one, same machine, c=16 (perf/pool_row.py);
15. the front door under hostile traffic: memory while refusing compressed calls without a key,
   time to refuse floods of parts (perf/front_door_row.py);
16. steady callers' latency beside impatient callers with 12 MB images and 20-110 ms deadlines
   (perf/chaos_row.py).
17. grammar work at Qwen2.5-VL's vocabulary size (152,064, synthetic): the task schemas' compile
   against what submission waits, a step's masks at 1, 16 and 64 rows, and what a step still waits
   for them after a forward (perf/grammar_row.py).
18. the engine at real scale (issue 25): the prefix cache on a chat's second turn and five questions
   about one document, a decode step paged / dense (perf/paged_row.py), rows admitted under one cache
   budget with mixed prompt lengths and short prompts beside a long one, now / before the paged cache
   (perf/mixed_lengths_row.py).
19. resident memory of every process of the stack, idle and after 1,000 requests per family, on a stack
   of its own (perf/memory_row.py).
20. preprocessing images/s through Triton at 1, 2 and 4 instances, and which process takes the cores
   (perf/scaling_row.py).
21. video: decode + preprocessing frames/s per family, and a 10-second clip's request latency split into
   decode + preprocessing, encode and generate, on a server of its own (perf/video_row.py).
22. cache-aware routing / least-loaded routing over three Triton servers: encoder-cache hit rate, prompt
   tokens from the prefix cache and p99 latency, on chats about an image and five questions per document
   (perf/affinity_row.py).
23. a server lost under load: one of three Triton servers SIGKILLed under streaming load and started
   again: requests lost (streams included), p99 during the loss / steady, time until the replacement
   takes traffic (perf/fault_row.py).
With perf_analyzer installed (`make perf-tools`), its throughput per ensemble is added beside.
Every server is started here and stopped on exit (Ctrl-C included); nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import inspect
import io
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from perf.encoders import mid_size_qwen_checkpoint, rows as encoder_rows
from perf.image_kinds import accuracy_and_time as classifier_accuracy_and_time
from perf.load import GatewayTarget, TritonTarget, run_load
from perf.workload import perf_analyzer_input, synthetic_image, workload
from vlm_serving.deploy.render import PROFILES, Batching, copy_model_code, render_repository
from vlm_serving.deploy.stack import BENCH_PIDS, GatewayProcess, stop_on_signals
from vlm_serving.deploy.triton_server import BUILD, REPO_ROOT, TritonServer, stop_all
from vlm_serving.tiny_checkpoints import with_real_image_limits
from vlm_serving.preprocessing.preprocess import load_preprocessor

BENCH = BUILD / "bench"
PERF_ANALYZER = BUILD / "perf" / "bin" / "perf_analyzer"
KEY = "bench-key"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def progress(message: str) -> None:
    """One line on stderr as each step starts, with the seconds since the process started (the bench
    runs for minutes; `python -m perf.bench` and the row modules' `from perf.bench import` are two
    copies of this module, so the clock is the process's own)."""
    elapsed = time.time() - psutil.Process().create_time()
    print(f"bench [{elapsed:.0f} s]: {message}", file=sys.stderr, flush=True)


def repository(name: str, **profile_changes) -> Path:
    import shutil

    target = BENCH / name
    shutil.rmtree(target, ignore_errors=True)
    copy_model_code(REPO_ROOT / "model_repository", target)
    render_repository(target, replace(PROFILES["cpu"], **profile_changes))
    return target


def launch(process: TritonServer | GatewayProcess, servers: list) -> None:
    """Start a server or gateway of this run: on `servers` (stopped on exit) before it starts, and
    recorded under build/bench/pids/ while it runs, so `make down` stops what a killed bench left."""
    process.pid_file = BENCH_PIDS / f"{os.getpid()}-{process.log_path.stem}.pid"
    servers.append(process)
    process.start()


def triton(name: str, servers: list, env: dict[str, str] | None = None, **profile_changes) -> TritonServer:
    """A started server, on `servers` (stopped on exit) before it is waited for; `env`: added to
    its environment."""
    progress(f"starting Triton '{name}'")
    server = TritonServer(repository=repository(name, **profile_changes), http_port=free_port(),
                          grpc_port=free_port(), metrics_port=free_port(), log_path=BENCH / f"{name}.log",
                          extra_env=env or {})
    launch(server, servers)
    server.wait_ready(300)
    return server


# One event loop for every load run: grpc.aio binds its completion-queue poller to the first loop
# it runs in, so a second `asyncio.run` leaves callbacks for a closed loop ("Event loop is closed").
_LOOP: asyncio.AbstractEventLoop | None = None


def run_on_bench_loop(coroutine):
    global _LOOP
    _LOOP = _LOOP or asyncio.new_event_loop()
    return _LOOP.run_until_complete(coroutine)


def load(target, items, concurrency, requests, max_tokens, stream=False):
    async def go():
        client = target()
        try:
            return await run_load(client, items, concurrency, requests, max_tokens, stream)
        finally:
            await client.close()

    return run_on_bench_loop(go())


def failures(*results) -> str:
    """What failed in a row's runs ("" when nothing did): such a row is marked, not reported."""
    counts = Counter()
    for result in results:
        counts.update(result.errors_by_code)
    return ", ".join(f"{code} x{count}" for code, count in sorted(counts.items()))


def checkpoint_with_real_limits(family: str) -> Path:
    """A copy of the tiny checkpoint whose image processor has the real model's limits."""
    return with_real_image_limits(BUILD / "models" / family, BENCH / f"real_limits_{family}", family)


def preprocessing_ratio(real_limits: bool, rounds: int) -> tuple[float, float, float]:
    """(ours images/s, transformers images/s, max abs difference): 16 pictures in one call, both families."""
    from transformers import AutoImageProcessor

    pictures = [Image.open(io.BytesIO(item.image)).convert("RGB") for item in workload(16)]
    ours_time = theirs_time = 0.0
    worst = 0.0
    for family in ("qwen2_5_vl", "pixtral"):
        checkpoint = checkpoint_with_real_limits(family) if real_limits else BUILD / "models" / family
        ours = load_preprocessor(family, checkpoint)
        theirs = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=True)
        placeholders = np.array([ours.image_pad_id if family == "qwen2_5_vl" else ours.image_id] * len(pictures))
        # At the checkpoint's own limits, as transformers' processor resizes by default.
        ranges = [ours.checkpoint_range()] * len(pictures)
        mine = ours.build(pictures, placeholders, ranges).images
        worst = max(worst, max_difference(family, mine, theirs(pictures, return_tensors="np")))
        for _ in range(rounds):
            started = time.perf_counter()
            ours.build(pictures, placeholders, ranges)
            ours_time += time.perf_counter() - started
            started = time.perf_counter()
            theirs(pictures, return_tensors="np")
            theirs_time += time.perf_counter() - started
    count = 2 * rounds * len(pictures)
    return count / ours_time, count / theirs_time, worst


def max_difference(family: str, images: list[dict], reference) -> float:
    """Our per-image encoder patches against the image processor's tensors."""
    if family == "qwen2_5_vl":
        return float(np.abs(np.concatenate([i["pixel_values"] for i in images]) - reference["pixel_values"]).max())
    worst = 0.0
    for image, padded, (height, width) in zip(images, reference["pixel_values"], reference["image_sizes"]):
        rows, cols = height // 16, width // 16
        patches = padded[:, :height, :width].reshape(3, rows, 16, cols, 16).transpose(1, 3, 0, 2, 4).reshape(rows * cols, -1)
        worst = max(worst, float(np.abs(image["pixel_values"] - patches).max()))
    return worst


def cache_hit_ratio(server: TritonServer, count: int, size: tuple[int, int] = (320, 240)) -> tuple[float, float]:
    """Median latency (s) of a request with an image seen for the first time and of the same again (1 token)."""
    from vlm_serving.ensemble_client import generate, user_message

    misses, hits = [], []
    for i in range(count):
        image = synthetic_image(*size, "JPEG", seed=5000 + i)  # never seen by this server
        for latencies in (misses, hits):
            started = time.perf_counter()
            generate(server.grpc_url, "qwen2_5_vl", user_message("What is in the picture?", 1), [image], max_tokens=1)
            latencies.append(time.perf_counter() - started)
    return statistics.median(misses), statistics.median(hits)


def mid_size_checkpoints() -> Path:
    """A checkpoints folder whose qwen2_5_vl has the mid-size vision tower (pixtral: the tiny one)."""
    target = BENCH / "mid_checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    for family, source in (("qwen2_5_vl", mid_size_qwen_checkpoint()), ("pixtral", BUILD / "models" / "pixtral")):
        link = target / family
        if not link.is_symlink():
            link.symlink_to(source.resolve())
    return target


def perf_analyzer(server: TritonServer, ensemble: str, stream: bool) -> str:
    """perf_analyzer's throughput at concurrency 16 (CSV kept under build/bench/)."""
    data = perf_analyzer_input(workload(16), 16, stream, BENCH / f"input_{ensemble}.json")
    out = BENCH / f"perf_analyzer_{ensemble}_{'stream' if stream else 'unary'}.csv"
    command = [str(PERF_ANALYZER), "-m", ensemble, "-u", server.grpc_url, "-i", "grpc", "--streaming",
               "--input-data", str(data), "--concurrency-range", "16:16", "--measurement-interval", "4000",
               "--stability-percentage", "50", "-f", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return f"failed: {result.stdout[-300:]}{result.stderr[-300:]}"
    row = next(csv.DictReader(out.open()))
    return f"{float(row['Inferences/Second']):.1f} infer/s, p50 {int(row['p50 latency']) / 1000:.0f} ms"


def constrained_decoding_rows() -> list[tuple]:
    """Rows 12a-c: perf.engine's constrained-decoding measures on the tiny Qwen2.5-VL, in the engine."""
    from perf.engine import SHAPES, constrained_rows
    from vlm_serving.generation.batch import BatchGenerator
    from vlm_serving.generation.loading import load_model, load_tokenizer

    checkpoint = BUILD / "models" / "qwen2_5_vl"
    generator = BatchGenerator("qwen2_5_vl", load_model(checkpoint), load_tokenizer(checkpoint))
    goals = {">= 0.9": "x", "reported": "x"}
    return [(f"12{'abc'[i]}", name.removeprefix("qwen2_5_vl: "), measured, ratio, goal, goals[goal], "")
            for i, (name, measured, ratio, goal) in enumerate(constrained_rows("qwen2_5_vl", generator, SHAPES["tiny"]))]


def alternate(first, second, rounds=3):
    """`first()` and `second()` (load runs) in alternation: (the pairs, the median throughput ratio or
    None when a run failed, why it failed)."""
    pairs = [(first(), second()) for _ in range(rounds)]
    failed = failures(*(side for pair in pairs for side in pair))
    return pairs, (None if failed else statistics.median(a.throughput / b.throughput for a, b in pairs)), failed


def throughputs(pairs) -> str:
    return " ; ".join(f"{a.throughput:.1f}/{b.throughput:.1f}" for a, b in pairs) + " req/s"


def rows_over_one_gateway(name: str, rows_of) -> None:
    """A row script run alone: one Triton server and a gateway over it, `rows_of(gateway, server)` printed
    as the table; every server stopped after (signals too)."""
    stop_on_signals()
    BENCH.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        server = triton(name, servers)
        gateway = GatewayProcess(triton_url=server.grpc_url, address=f"127.0.0.1:{free_port()}", metrics_port=free_port(),
                                 log_path=BENCH / f"gateway_{name}.log", http_address=f"127.0.0.1:{free_port()}",
                                 extra_env={"VLM_API_KEYS": KEY})
        launch(gateway, servers)
        gateway.wait_serving(60)
        print_table(rows_of(gateway, server))
    finally:
        stop_all(reversed(servers))


def table_row(key, name, measured, ratio, goal, unit, failed) -> str:
    """One row (key, measure, measured, ratio, goal, unit, failed) as a line of RESULTS.md's tables."""
    if failed:
        value = f"not a result: {failed}"
    else:
        value = f"{ratio:.2f}x" if unit == "x" else f"{ratio:.2f} {unit}"
    return f"| {key} | {name} | {measured} | {value} | {goal} |"


TABLE_HEADER = "\n| # | measure | measured | ratio | goal |\n| --- | --- | --- | --- | --- |"


def print_table(rows) -> None:
    """Rows as the Markdown table RESULTS.md holds, in key order."""
    print(TABLE_HEADER)
    for row in sorted(rows):
        print(table_row(*row))


class Table:
    """`make bench`'s rows: each printed the moment it is measured (a long run shows what it has
    so far, and a stopped one keeps it), then the whole table in key order at the end."""

    def __init__(self):
        self.rows: list[tuple] = []
        print("rows as measured:" + TABLE_HEADER, flush=True)

    def add(self, *rows: tuple) -> None:
        for row in rows:
            self.rows.append(row)
            print(table_row(*row), flush=True)


class Run:
    """What the row groups share: the run's size, its servers (stopped on exit) and the stack most
    rows measure, one Triton server with in-flight batching and a gateway over it, started when a
    group first asks for it."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.scale = 0.25 if quick else 1.0
        self.servers: list = []
        self.notes: list[str] = []
        self.images = workload(16)
        self.text_only = workload(16, with_images=False)
        self._stack: tuple[TritonServer, GatewayProcess] | None = None

    def n(self, count: int) -> int:
        return max(8, int(count * self.scale))

    def stack(self) -> tuple[TritonServer, GatewayProcess]:
        if self._stack is None:
            batched = triton("batched", self.servers)
            gateway = GatewayProcess(triton_url=batched.grpc_url, address=f"127.0.0.1:{free_port()}",
                                     metrics_port=free_port(), log_path=BENCH / "gateway.log",
                                     http_address=f"127.0.0.1:{free_port()}", extra_env={"VLM_API_KEYS": KEY})
            launch(gateway, self.servers)
            gateway.wait_serving(60)
            self._stack = batched, gateway
        return self._stack

    def stop_servers(self) -> None:
        stop_all(reversed(self.servers))
        self.servers.clear()
        self._stack = None


def batching_rows(run: Run) -> list[tuple]:
    # Both servers up at once, measured in alternation (A B A B A B): on this shared VM the speed
    # drifts by up to a third over minutes, and alternating keeps a ratio's two sides under the same
    # conditions. Each ratio is the median of the rounds' ratios.
    unbatched = triton("unbatched", run.servers, preprocess_batching=Batching(1, (1,), 0, 256),
                       generate_batching=Batching(1, (1,), 0, 256), scheduler="static")
    batched, _ = run.stack()
    progress("row 2: dynamic batching on / off")
    pairs, ratio, failed = alternate(
        lambda: load(lambda: TritonTarget(batched.grpc_url, "qwen2_5_vl"), run.images, 16, run.n(64), 32),
        lambda: load(lambda: TritonTarget(unbatched.grpc_url, "qwen2_5_vl"), run.images, 16, run.n(48), 32))
    unbatched.stop()
    run.servers.remove(unbatched)
    return [("2", "batching on (default: in flight) / off (static, max batch 1), c=16, 32 tokens",
             throughputs(pairs), ratio, ">= 4", "x", failed)]


def gateway_rows(run: Run) -> list[tuple]:
    batched, gateway = run.stack()
    progress("row 1: the gateway against direct Triton")
    rows = front_door_cost(run, batched, lambda model: GatewayTarget(gateway.address, KEY, model), ("1a", "1b"),
                           ">= 0.95", "<= 1 ms", "")
    progress("row 1: the same with mutual TLS and a named key with quotas")
    secured = secured_gateway(run, batched)
    return rows + front_door_cost(run, batched, secured, ("1c", "1d"), "reported", "reported",
                                  ", mutual TLS and a named key with quotas")


def front_door_cost(run: Run, batched: TritonServer, target, keys: tuple[str, str], throughput_goal: str,
                    latency_goal: str, how: str) -> list[tuple]:
    """Rows `keys`: the gateway's throughput over direct Triton's (c=16, images), and the latency it
    adds to a trivial request (c=1), through `target(model)` (a load target on the gateway)."""
    pairs, ratio, failed = alternate(
        lambda: load(lambda: target("qwen2.5-vl"), run.images, 16, run.n(96), 16),
        lambda: load(lambda: TritonTarget(batched.grpc_url, "qwen2_5_vl"), run.images, 16, run.n(96), 16))
    table = [(keys[0], f"gateway{how} / direct Triton throughput, c=16, 16 tokens", throughputs(pairs), ratio,
              throughput_goal, "x", failed)]
    added, runs = [], []
    for _ in range(3):
        via_gateway = load(lambda: target("pixtral"), run.text_only, 1, run.n(100), 1)
        direct = load(lambda: TritonTarget(batched.grpc_url, "pixtral"), run.text_only, 1, run.n(100), 1)
        runs += [via_gateway, direct]
        added.append((via_gateway.percentile(50) - direct.percentile(50)) * 1000)
    failed = failures(*runs)
    table.append((keys[1], f"gateway{how} added p50 latency, trivial request (text, 1 token), c=1",
                  " ; ".join(f"{a:.2f}" for a in added) + " ms", None if failed else statistics.median(added),
                  latency_goal, "ms", failed))
    return table


def secured_gateway(run: Run, batched: TritonServer):
    """A second gateway over the same server with mutual TLS on its listener and its callers' key
    from a key file, with quotas set high enough never to refuse (their checks still run on every
    request); a load target factory for it."""
    import grpc

    from gateway.keys import KeyEntry, Limits, entry_line, hash_key, new_key
    from tests.certificates import Authority

    pki = BENCH / "pki"
    server_ca, client_ca = Authority("bench-server-ca", pki), Authority("bench-client-ca", pki)
    server_ca.issue("gateway", pki / "server.pem", pki / "server.key")
    client_ca.issue("bench", pki / "client.pem", pki / "client.key")
    credentials = grpc.ssl_channel_credentials(server_ca.path.read_bytes(), (pki / "client.key").read_bytes(),
                                               (pki / "client.pem").read_bytes())
    key_id, key = new_key()
    limits = Limits(requests_per_second=100_000, burst=100_000, max_concurrent=1024, tokens_per_minute=10**9)
    (pki / "keys").write_text(entry_line(KeyEntry("bench", "user", limits, key_id, hash_key(key))) + "\n")
    gateway = GatewayProcess(triton_url=batched.grpc_url, address=f"localhost:{free_port()}", metrics_port=free_port(),
                             log_path=BENCH / "gateway_secured.log", credentials=credentials, extra_env={
                                 "VLM_TLS_CERT_FILE": str(pki / "server.pem"), "VLM_TLS_KEY_FILE": str(pki / "server.key"),
                                 "VLM_TLS_CLIENT_CA_FILE": str(client_ca.path), "VLM_API_KEYS_FILE": str(pki / "keys"),
                                 "VLM_MODEL_CAPACITY": "64"})
    launch(gateway, run.servers)
    gateway.wait_serving(60)
    return lambda model: GatewayTarget(gateway.address, key, model, credentials)


def http_rows(run: Run) -> list[tuple]:
    from perf import http_row

    progress("row 13: the OpenAI-compatible HTTP API against gRPC")
    return [http_row.row(run.stack()[1], run.images, run.n(96))]


def front_door_rows(run: Run) -> list[tuple]:
    from perf import front_door_row

    return front_door_row.rows(run.stack()[1], KEY)


def chaos_rows(run: Run) -> list[tuple]:
    from perf import chaos_row

    batched, gateway = run.stack()
    return chaos_row.rows(gateway, batched, KEY)


def pool_rows(run: Run) -> list[tuple]:
    from perf import pool_row

    progress("row 14: a gateway over two Triton servers against one")
    batched, gateway = run.stack()
    return [pool_row.row(gateway, batched, run.servers, run.images, run.n(96))]


def first_text_rows(run: Run) -> list[tuple]:
    progress("row 4: time to first text")
    streamed = load(lambda: GatewayTarget(run.stack()[1].address, KEY, "qwen2.5-vl"), run.images, 1, run.n(24), 64,
                    stream=True)
    first, whole = streamed.percentile(50, streamed.first_text), streamed.percentile(50)
    short = [tokens for tokens in streamed.completion_tokens if tokens != 64]
    failed = failures(streamed) or (f"{len(short)} answers ended before 64 tokens" if short else "")
    return [("4", "stream: first text / whole response, 64 tokens, c=1", f"{first * 1000:.1f} / {whole * 1000:.1f} ms",
             None if failed else first / whole, "<= 0.2", "x", failed)]


def auto_rows(run: Run) -> list[tuple]:
    progress("row 8: model auto")
    batched, _ = run.stack()
    images, n = run.images, run.n
    photos_only = "auto routed some workload images elsewhere than Qwen2.5-VL"

    def auto(**routing):
        return lambda: TritonTarget(batched.grpc_url, "auto", routing)

    pairs = [(load(auto(fallback=False), images, 1, n(32), 16),
              load(lambda: TritonTarget(batched.grpc_url, "qwen2_5_vl"), images, 1, n(32), 16)) for _ in range(3)]
    failed = failures(*(side for pair in pairs for side in pair))
    if not failed and any(set(a.routes) != {("default", "qwen2_5_vl")} for a, _ in pairs):
        failed = photos_only
    table = [("8a", "routing overhead: p50 latency, auto without fallback / Qwen2.5-VL directly, c=1, 16 tokens",
              " ; ".join(f"{a.percentile(50) * 1000:.1f}/{b.percentile(50) * 1000:.1f}" for a, b in pairs) + " ms",
              None if failed else statistics.median(a.percentile(50) / b.percentile(50) for a, b in pairs),
              "<= 1.05", "x", failed)]
    fallback = load(auto(confidence_threshold=0.0), images, 1, n(24), 16)
    direct = load(auto(fallback=False), images, 1, n(24), 16)
    failed = failures(fallback, direct) or (
        "" if set(fallback.routes) == {("low_confidence", "pixtral")} else "not every request fell back")
    table.append(("8b", "fallback cost: p50 latency, auto falling back (threshold 0) / auto without fallback, c=1, "
                  "16 tokens", f"{fallback.percentile(50) * 1000:.1f} / {direct.percentile(50) * 1000:.1f} ms",
                  None if failed else fallback.percentile(50) / direct.percentile(50), "reported", "x", failed))
    held = load(auto(confidence_threshold=-100.0), images, 1, n(24), 64, stream=True)
    streamed_at_once = load(auto(fallback=False), images, 1, n(24), 64, stream=True)
    failed = failures(held, streamed_at_once)
    held_first = held.percentile(50, held.first_text)
    at_once_first = streamed_at_once.percentile(50, streamed_at_once.first_text)
    table.append(("8c", "holding for the fallback: stream first text, auto answer kept (held) / auto without "
                  "fallback (streamed), c=1, 64 tokens", f"{held_first * 1000:.1f} / {at_once_first * 1000:.1f} ms",
                  None if failed else held_first / at_once_first, "reported", "x", failed))
    return table


def encoder_cache_rows(run: Run) -> list[tuple]:
    progress("row 6: encoder cache hit / miss")
    miss, hit = cache_hit_ratio(run.stack()[0], run.n(24))
    table = [("6a", "repeated image, request latency cache hit / miss, qwen2_5_vl (tiny tower), 1 token, c=1",
              f"{hit * 1000:.1f} / {miss * 1000:.1f} ms", hit / miss, "< 1", "x", "")]
    if run.quick:  # 6b starts a server of its own
        return table
    # The same with an encoder of real width (perf/encoders.py's 4x1280 tower) serving, 448x448 images.
    mid = triton("mid_encoder", run.servers, checkpoints_dir=mid_size_checkpoints())
    miss, hit = cache_hit_ratio(mid, run.n(12), size=(448, 448))
    mid.stop()
    run.servers.remove(mid)
    table.append(("6b", "repeated image, request latency cache hit / miss, Qwen2.5-VL-style tower 4x1280 serving, "
                  "448x448, 1 token, c=1", f"{hit * 1000:.1f} / {miss * 1000:.1f} ms", hit / miss, "< 1", "x", ""))
    return table


def perf_analyzer_notes(run: Run) -> list[tuple]:
    if not PERF_ANALYZER.exists():
        run.notes.append("perf_analyzer not installed (`make perf-tools`): its rows are skipped")
        return []
    for ensemble in ("qwen2_5_vl", "pixtral"):
        for stream in (False, True):
            run.notes.append(f"perf_analyzer {ensemble} {'stream' if stream else 'unary'} c=16, 16 tokens: "
                             f"{perf_analyzer(run.stack()[0], ensemble, stream)}")
    return []


def preprocessing_rows(run: Run) -> list[tuple]:
    progress("row 3: preprocessing")
    table = []
    for key, real, label in (("3a", False, "tiny checkpoints' limits"), ("3b", True, "real checkpoints' limits")):
        ours, theirs, worst = preprocessing_ratio(real, rounds=max(1, int(3 * run.scale)))
        unequal = f"outputs differ by {worst:.2e} (> 1e-5)" if worst > 1e-5 else ""
        table.append((key, f"preprocessing images/s, ours / transformers, 16 images a call, {label} "
                      f"(max |diff| {worst:.1e})", f"{ours:.1f} / {theirs:.1f} images/s", ours / theirs, ">= 3", "x",
                      unequal))
    return table


def classifier_rows(run: Run) -> list[tuple]:
    progress("row 9: image-kind classifier")
    right, total, median_ms, worst_ms = classifier_accuracy_and_time(rounds=max(2, int(5 * run.scale)))
    return [("9a", "image-kind classifier, ms per 1-megapixel image (median; worst over the tuning corpus)",
             f"{median_ms:.2f} ms (worst {worst_ms:.2f})", median_ms, "<= 2 ms", "ms", ""),
            ("9b", "image-kind classifier accuracy, held-out real images", f"{right} of {total}", right / total,
             ">= 0.9", "x", "")]


def encoder_speed_rows(run: Run) -> list[tuple]:
    progress("rows 5, 7: vision encoders")
    return encoder_rows(rounds=max(2, int(3 * run.scale)))


def scheduling_rows(run: Run) -> list[tuple]:
    from perf.inflight import rows

    return rows(run.scale)


def constrained_rows(run: Run) -> list[tuple]:
    progress("row 12: constrained decoding")
    return constrained_decoding_rows()


def grammar_rows(run: Run) -> list[tuple]:
    from perf import grammar_row

    progress("row 17: grammar at a real vocabulary")
    return grammar_row.rows()


def engine_scale_rows(run: Run) -> Iterator[list[tuple]]:
    from perf import mixed_lengths_row, paged_row

    progress("rows 18a-f: the prefix cache and the paged cache's decode step")
    yield paged_row.rows(run.quick)
    progress("rows 18g-h: mixed prompt lengths, now and before the paged cache")
    yield mixed_lengths_row.rows(run.quick)


def memory_rows(run: Run) -> list[tuple]:
    from perf import memory_row

    return memory_row.rows_on_a_new_stack(run.servers, run.n(1000))


def scaling_rows(run: Run) -> list[tuple]:
    from perf import scaling_row

    return scaling_row.rows(run.servers, run.quick)


def affinity_rows(run: Run) -> list[tuple]:
    from perf import affinity_row

    return affinity_row.rows(run.quick)


def fault_rows(run: Run) -> list[tuple]:
    from perf import fault_row

    return fault_row.rows(run.quick)


def video_rows(run: Run) -> list[tuple]:
    from perf import video_row

    return list(video_row.rows(run.servers, requests=3 if run.quick else 5))


# Row groups by name, in the order they run. The first ones measure servers (the stack and servers of
# their own); the rest run in this process with every server stopped (they would take cores from both
# sides of a ratio).
SERVED = {"2": batching_rows, "1": gateway_rows, "13": http_rows, "15": front_door_rows, "16": chaos_rows,
          "14": pool_rows, "4": first_text_rows, "8": auto_rows, "6": encoder_cache_rows,
          "perf_analyzer": perf_analyzer_notes, "19": memory_rows, "20": scaling_rows, "21": video_rows,
          "22": affinity_rows, "23": fault_rows}
IN_PROCESS = {"3": preprocessing_rows, "9": classifier_rows, "5": encoder_speed_rows, "10": scheduling_rows,
              "12": constrained_rows, "17": grammar_rows, "18": engine_scale_rows}
# --quick: a smoke run of every kind of measure within 4 minutes on 2 cores; the groups that start
# servers of their own or run for minutes wait for a whole run (or --only).
QUICK = ("1", "13", "4", "6", "3", "9", "12", "18")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks with ratios measured in one run.")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer requests and only rows {', '.join(QUICK)} (a smoke run, noisier; within 4 minutes)")
    parser.add_argument("--only", nargs="+", choices=[*SERVED, *IN_PROCESS], metavar="GROUP",
                        help=f"only these row groups: {', '.join([*SERVED, *IN_PROCESS])}")
    args = parser.parse_args(argv)
    chosen = set(args.only or (QUICK if args.quick else [*SERVED, *IN_PROCESS]))
    stop_on_signals()  # SIGINT, SIGTERM and SIGHUP stop the servers (the finally below), never orphan them
    BENCH.mkdir(parents=True, exist_ok=True)
    run, table = Run(args.quick), Table()
    try:
        for name, group in SERVED.items():
            if name in chosen:
                table.add(*group(run))
    finally:
        run.stop_servers()
    for name, group in IN_PROCESS.items():
        if name in chosen:
            measured = group(run)
            # A group returns its rows, or yields them in parts as it measures them (each part printed at once).
            for part in measured if inspect.isgenerator(measured) else [measured]:
                table.add(*part)
    print_table(table.rows)
    skipped = [name for name in [*SERVED, *IN_PROCESS] if name not in chosen]
    if skipped:
        run.notes.append(f"not run: row groups {', '.join(skipped)} (make bench without --quick / --only runs them)")
    for note in run.notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
