"""Rows 20 of `make bench` (also alone): preprocessing images/s through Triton at 1, 2 and 4 instances (issue 26).

    .venv/bin/python -m perf.scaling_row [--instances 1 2 4] [--seconds 20] [--concurrency 48]

On a larger machine the same command measures more counts, e.g. `--instances 1 2 4 8 16 32` on a 32-core
node (each count needs the cores to show: N instances scale at most to the cores the server may use).

For each instance count, a Triton server of its own (the CPU profile with `preprocess_instances` N, the
Qwen2.5-VL checkpoint with the real model's image limits) loads only `qwen2_5_vl_preprocess`, and a closed
loop sends it requests of one image each (the bench's 16 pictures: JPEG, PNG, WebP, GIF, 160x120 to
800x600) with enough concurrency to keep every instance's batches full. Straight to the preprocessing
model, not the ensemble: the ensemble would add the embed step, the encoder and a generation step to
every request, and on these cores their CPU would be taken from preprocessing, so the figure would not
be preprocessing's. Only the small IMAGE_TOKENS output is asked back: the encoder's inputs still cross
the stub's shared memory into Triton (as in the ensemble), but not the wire to the load generator.

While it runs, each process's CPU seconds are read (psutil): the preprocessing stubs, tritonserver, this
load generator and the machine's other processes. Their shares name the next limit: when the stubs hold
all the cores, it is the preprocessing work itself (more instances need more cores); a large tritonserver
or load-generator share is a limit that more instances cannot lift. The last row runs the whole pipeline
(the ensemble, 1 token, the embedding cache off) and reads each step's CPU per image: the embed step is
one instance (one cache), so its CPU per image bounds the images/s any preprocessing count can pass on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

from perf.workload import messages, workload

MODEL = "qwen2_5_vl_preprocess"
INSTANCE_COUNTS = (1, 2, 4)


def real_limits_checkpoints() -> Path:
    """A checkpoints folder whose qwen2_5_vl has the real model's image limits (pixtral: the tiny one)."""
    from perf.bench import BENCH, checkpoint_with_real_limits
    from vlm_serving.deploy.triton_server import BUILD

    checkpoints = BENCH / "scaling_checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for family, source in (("qwen2_5_vl", checkpoint_with_real_limits("qwen2_5_vl")), ("pixtral", BUILD / "models" / "pixtral")):
        link = checkpoints / family
        if not link.is_symlink():
            link.symlink_to(source.resolve())
    return checkpoints


def started_server(name: str, servers: list, models: tuple[str, ...], **profile_changes):
    """A started Triton serving only `models` (and what they compose), on the real image limits."""
    from perf.bench import BENCH, free_port, launch, repository
    from vlm_serving.deploy.triton_server import TritonServer

    server = TritonServer(repository=repository(name, checkpoints_dir=real_limits_checkpoints(), **profile_changes),
                          http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_path=BENCH / f"{name}.log", load_models=models)
    launch(server, servers)
    server.wait_ready(300)
    return server


def stopped(server, servers: list) -> None:
    from vlm_serving.deploy.triton_server import stop_all

    stop_all([server])
    servers.remove(server)


def process_groups(server) -> dict[str, list[psutil.Process]]:
    """A run's processes by group: the Python-backend stubs by model (every instance), tritonserver, and the
    load generator (this process)."""
    from perf.memory_row import INSTANCE, children, stub_instance

    groups = defaultdict(list)
    for pid in children(server.process.pid):
        if (instance := stub_instance(pid)) is not None:
            groups[INSTANCE.match(instance)["model"]].append(psutil.Process(pid))
    return dict(groups) | {"tritonserver": [psutil.Process(server.process.pid)], "load generator": [psutil.Process()]}


def cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds (user + system) of each group so far, and "other processes": the machine's busy seconds
    less the groups' (on a shared machine, what was taken from the run)."""
    used = {name: sum(sum(p.cpu_times()[:2]) for p in group) for name, group in processes.items()}
    machine = psutil.cpu_times()
    used["other processes"] = machine.user + machine.nice + machine.system + machine.irq + machine.softirq - sum(used.values())
    return used


async def closed_loop(url: str, concurrency: int, seconds: float, processes: dict) -> tuple[int, int, float, dict]:
    """(images answered, errors, seconds, each process group's cores busy): `concurrency` callers, each
    sending its next one-image request when its last is answered, for `seconds` after a warm-up."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    items = workload(16)
    requests = []
    for item in items:
        message = grpcclient.InferInput("MESSAGES", [1, 1], "BYTES")
        message.set_data_from_numpy(np.array([[json.dumps(messages(item)).encode()]], dtype=np.object_))
        image = grpcclient.InferInput("IMAGES", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[item.image]], dtype=np.object_))
        requests.append([message, image])
    wanted = [grpcclient.InferRequestedOutput("IMAGE_TOKENS")]
    client = grpcclient.InferenceServerClient(url)
    answered = errors = 0
    try:
        for _ in range(2):  # warm-up: every picture twice, from every instance's first batches on
            await asyncio.gather(*(client.infer(MODEL, inputs, outputs=wanted) for inputs in requests))
        before = cpu_seconds(processes)
        deadline = time.perf_counter() + seconds

        async def caller(offset: int):
            nonlocal answered, errors
            index = offset
            while time.perf_counter() < deadline:
                try:
                    await client.infer(MODEL, requests[index % len(requests)], outputs=wanted)
                    answered += 1
                except InferenceServerException:
                    errors += 1
                index += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed, after = time.perf_counter() - started, cpu_seconds(processes)
        # 1.0: one core busy throughout the measured seconds.
        return answered, errors, elapsed, {name: (after[name] - before[name]) / elapsed for name in after}
    finally:
        await client.close()


def measure(instances: int, servers: list, concurrency: int, seconds: float) -> dict:
    """images/s and each process group's CPU share of the run, on a server started for it (stopped after)."""
    from perf.bench import progress, run_on_bench_loop

    progress(f"row 20: Triton with {instances} preprocessing instance(s)")
    server = started_server(f"scaling_{instances}", servers, (MODEL,), preprocess_instances=instances)
    try:
        processes = process_groups(server)
        progress(f"row 20: {instances} instance(s), c={concurrency}, {seconds:.0f} s")
        answered, errors, elapsed, cores = run_on_bench_loop(closed_loop(server.grpc_url, concurrency, seconds, processes))
    finally:
        stopped(server, servers)
    return {"instances": instances, "stubs": len(processes.get(MODEL, [])), "images_per_s": answered / elapsed,
            "errors": errors, "cores": cores}


def next_limit(result: dict, cores: int) -> str:
    """Each group's cores busy, and which of the run's own processes took the most."""
    used = {"preprocessing" if name == MODEL else name: busy for name, busy in result["cores"].items()}
    shares = ", ".join(f"{name} {busy:.2f}" for name, busy in used.items())
    ours = {name: busy for name, busy in used.items() if name != "other processes"}
    largest = {"preprocessing": "the preprocessing instances' own work", "tritonserver": "Triton itself",
               "load generator": "the load generator"}[max(ours, key=ours.get)]
    return f"cores busy: {shares} (of {cores}; largest of the run's: {largest})"


def pipeline_row(key: str, servers: list, instances: int, requests: int) -> tuple:
    """The whole pipeline (the ensemble, 1 token, the embedding cache off: every image encoded), c=16:
    each model's CPU per image, and the images/s the one embed instance (one cache) could pass at most."""
    from perf.bench import failures, load, progress, run_on_bench_loop
    from perf.load import TritonTarget, run_load

    progress(f"row {key}: the ensemble with {instances} preprocessing instances, CPU per image by step")
    server = started_server("scaling_pipeline", servers, ("qwen2_5_vl", "qwen2_5_vl_encoder"), preprocess_instances=instances,
                            encoder_cache_bytes=0)
    try:
        groups = process_groups(server)
        images = workload(16)
        target = lambda: TritonTarget(server.grpc_url, "qwen2_5_vl")  # noqa: E731
        warm = load(target, images, 16, 16, 1)

        async def measured_run():
            client = target()
            try:
                return await run_load(client, images, 16, requests, 1, warmup=0)
            finally:
                await client.close()

        before = cpu_seconds(groups)
        result = run_on_bench_loop(measured_run())
        after = cpu_seconds(groups)
    finally:
        stopped(server, servers)
    per_image = {name: 1000 * (after[name] - before[name]) / requests for name in after if name != "other processes"}
    embed = per_image["qwen2_5_vl_embed"]
    steps = ", ".join(f"{name.removeprefix('qwen2_5_vl_')} {ms:.1f}" for name, ms in
                      sorted(per_image.items(), key=lambda item: -item[1]))
    return (key, f"the pipeline: qwen2_5_vl ensemble, 1 token, embedding cache off, real image limits, c=16, {instances} "
            f"preprocessing instances: CPU ms per image by process (the embed step is one instance: its ceiling is "
            f"1000 / its ms images/s)", f"{result.throughput:.1f} images/s; ms per image: {steps}", 1000 / embed,
            "reported (embed step's ceiling)", "images/s", failures(warm, result))


def rows(servers: list, quick: bool = False, counts=INSTANCE_COUNTS, concurrency: int = 48,
         seconds: float | None = None) -> list[tuple]:
    """Rows 20a-...: images/s at each count, the ratios to one instance, and the next limit."""
    cores = len(os.sched_getaffinity(0))
    seconds = seconds or (8.0 if quick else 20.0)
    results = [measure(count, servers, concurrency, seconds) for count in counts]
    one = results[0]

    def measured(result: dict) -> str:
        # The stubs' CPU per image: what an instance count costs per image whatever else takes the cores.
        return (f"{result['images_per_s']:.1f} images/s, "
                f"{1000 * result['cores'][MODEL] / result['images_per_s']:.1f} ms preprocessing CPU per image")

    table = []
    for index, result in enumerate(results):
        key = f"20{chr(ord('a') + index)}"
        failed = f"{result['errors']} requests failed" if result["errors"] else (
            f"{result['stubs']} stubs found, {result['instances']} expected" if result["stubs"] != result["instances"] else "")
        label = (f"preprocessing images/s through Triton ({MODEL} directly, real image limits, one image a request, "
                 f"c={concurrency}), {result['instances']} instance(s)")
        if result is one:
            table.append((key, label + f"; {next_limit(result, cores)}", measured(result),
                          result["images_per_s"], "reported", "images/s", failed))
            continue
        # Each instance keeps at most about one core busy: N instances scale to min(N, cores) at best.
        room = min(result["instances"], cores) / min(one["instances"], cores)
        beyond = (f"; {result['instances']} instances cannot scale beyond {cores} cores"
                  if result["instances"] > cores else "")
        goal = (f">= {0.8 * room:.1f} ({cores} cores: at most {room:.0f}x{beyond})" if room > 1
                else f"reported ({cores} cores{beyond})")
        table.append((key, label + f" / {one['instances']} instance(s); {next_limit(result, cores)}",
                      f"{measured(result)} / {measured(one)}", result["images_per_s"] / one["images_per_s"], goal,
                      "x", failed))
    table.append(pipeline_row(f"20{chr(ord('a') + len(results))}", servers, max(counts), 48 if quick else 160))
    return table


def main(argv: list[str] | None = None) -> int:
    from perf.bench import BENCH, print_table
    from vlm_serving.deploy.stack import stop_on_signals
    from vlm_serving.deploy.triton_server import stop_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=list(INSTANCE_COUNTS),
                        help="preprocessing instance counts, the first the baseline (default 1 2 4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per count")
    parser.add_argument("--concurrency", type=int, default=48, help="requests in flight (enough to fill every instance)")
    args = parser.parse_args(argv)
    stop_on_signals()
    BENCH.mkdir(parents=True, exist_ok=True)
    servers: list = []
    try:
        print_table(rows(servers, counts=args.instances, concurrency=args.concurrency, seconds=args.seconds))
    finally:
        stop_all(reversed(servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
