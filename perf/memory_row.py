"""Rows 19 of `make bench` (also alone): resident memory of every process of the stack (issue 26).

    .venv/bin/python -m perf.memory_row [--requests 1000]

One Triton server (the CPU profile) and a gateway over it. Each process's resident memory (VmRSS) is
read at idle (every model loaded, no request yet) and again after `requests` requests per family
through the gateway (c=16, 1 token each, the bench's 16 pictures of 8 sizes): Triton's Python-backend
stubs by model (each instance's figure listed), Triton itself, the gateway, and the whole stack.
Goal for the preprocessing instances (issue 26): <= 100 MiB at idle, <= 150 MiB after 1,000 requests;
the rest is reported. The preprocessing and embed steps import neither torch nor transformers
(tests/unit/test_lean_preprocessing.py asserts the modules; this measures the memory).

The tiny checkpoints' tokenizers hold 465 tokens; a released one holds 150,000 and more, and its
tokenizer is most of a preprocessing process's own memory. The last row loads the preprocessing step
in a fresh interpreter (no Triton) on a copy of the tiny Qwen2.5-VL whose tokenizer.json is a
byte-level BPE of Qwen2.5-VL's size (151,643 tokens and merges, drawn at random, seed 0).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from perf.front_door_row import MiB, resident_bytes

QWEN_VOCABULARY = 151_643
# What the preprocessing step reads of a checkpoint (no weights).
PREPROCESSING_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "chat_template.jinja")
# A fresh interpreter that loads the preprocessing step on a checkpoint, as a stub's `initialize` does,
# and prints its resident KiB.
IDLE_PROCESS = """
import sys
from vlm_serving.preprocessing.preprocess import load_preprocessor
load_preprocessor("qwen2_5_vl", sys.argv[1])
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS:")))
"""
# Gateway names of the families' ensembles.
GATEWAY_MODELS = ("qwen2.5-vl", "pixtral")
PREPROCESS_GOAL = "<= 100 MiB idle, <= 150 MiB after 1,000 requests"
# A Python-backend stub's command line names its model instance, e.g. "qwen2_5_vl_preprocess_0_0"
# (model, group, instance): the model is that name without its last two numbers.
INSTANCE = re.compile(r"^(?P<model>.+)_\d+_\d+$")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def stub_instance(pid: int) -> str | None:
    """The model instance a Python-backend stub serves, from its command line; None for other processes."""
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    if not arguments or not arguments[0].endswith("triton_python_backend_stub"):
        return None
    return next((argument for argument in arguments if INSTANCE.match(argument)), None)


def stack_processes(server, gateway) -> dict[str, int]:
    """Process name -> pid: each stub by its model instance, "tritonserver" and "gateway"."""
    processes = {"tritonserver": server.process.pid, "gateway": gateway.process.pid}
    for pid in children(server.process.pid):
        instance = stub_instance(pid)
        if instance is not None:
            processes[instance] = pid
    return processes


def resident_mib(processes: dict[str, int]) -> dict[str, float]:
    return {name: resident_bytes(pid) / MiB for name, pid in processes.items()}


def shared_mib(pid: int) -> float:
    """The part of a process's resident memory in shared memory (RssShmem): for a stub, mostly Triton's
    shared-memory region, which carries its requests' and answers' tensors."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak(gateway, key: str, requests: int) -> str:
    """`requests` requests per family through the gateway; what failed ("" when nothing did)."""
    from perf.bench import failures, load
    from perf.load import GatewayTarget
    from perf.workload import workload

    images = workload(16)
    results = [load(lambda: GatewayTarget(gateway.address, key, model), images, 16, requests, 1)
               for model in GATEWAY_MODELS]
    return failures(*results)


def real_vocabulary_checkpoint(tiny: Path, target: Path) -> Path:
    """`tiny`'s preprocessing files at `target`, its tokenizer.json's BPE grown to Qwen2.5-VL's vocabulary
    size: byte-level tokens, then random merges of two tokens (at most 12 characters), its added tokens after."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in PREPROCESSING_FILES:
        shutil.copy(tiny / name, target / name)
    tokenizer = json.loads((tiny / "tokenizer.json").read_text())
    byte_level = sorted(token for token in tokenizer["model"]["vocab"] if len(token) == 1)
    vocabulary, merges, draw = {token: i for i, token in enumerate(byte_level)}, [], random.Random(0)
    tokens = list(vocabulary)
    while len(vocabulary) < QWEN_VOCABULARY:
        first, second = draw.choice(tokens), draw.choice(tokens)
        if len(first) + len(second) <= 12 and first + second not in vocabulary:
            vocabulary[first + second] = len(vocabulary)
            tokens.append(first + second)
            merges.append([first, second])
    tokenizer["model"].update(vocab=vocabulary, merges=merges)
    for index, added in enumerate(tokenizer["added_tokens"]):
        added["id"] = len(vocabulary) + index
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    return target


def idle_process_mib(checkpoint: Path) -> float:
    result = subprocess.run([sys.executable, "-c", IDLE_PROCESS, str(checkpoint)], capture_output=True, text=True,
                            timeout=300, check=True)
    return int(result.stdout.split()[-1]) / 1024


def real_vocabulary_row(key: str) -> tuple:
    from perf.bench import BENCH
    from vlm_serving.deploy.triton_server import BUILD

    tiny = BUILD / "models" / "qwen2_5_vl"
    real = idle_process_mib(real_vocabulary_checkpoint(tiny, BENCH / "real_vocabulary_qwen2_5_vl"))
    return (key, f"resident memory, a preprocessing process at idle, Qwen2.5-VL's vocabulary size ({QWEN_VOCABULARY:,} "
            "tokens, synthetic BPE), no Triton", f"{real:.0f} MiB (the tiny tokenizer's: {idle_process_mib(tiny):.0f})",
            real, "<= 100 MiB", "MiB", "")


def rows(gateway, server, key: str, requests: int = 1000) -> list[tuple]:
    """Rows 19a-... of `make bench`'s table, measured on `server` and `gateway` (a GatewayProcess)."""
    from perf.bench import progress

    progress(f"row 19: resident memory per process, idle and after {requests:,} requests per family")
    time.sleep(2)  # the models' `initialize` has returned; let the stubs settle
    processes = stack_processes(server, gateway)
    idle = resident_mib(processes)
    failed = soak(gateway, key, requests)
    after = resident_mib(processes)
    shared = {name: shared_mib(pid) for name, pid in processes.items()}
    by_model = defaultdict(list)
    for name in processes:
        match = INSTANCE.match(name)
        by_model[match["model"] if match else name].append(name)
    table = []
    order = sorted(by_model, key=lambda model: (model in ("tritonserver", "gateway"), model))
    for index, model in enumerate(order):
        names = sorted(by_model[model])
        largest = max(names, key=after.get)
        instances = (f" ({len(names)} instances: " + ", ".join(f"{idle[n]:.0f} -> {after[n]:.0f}" for n in names) + ")"
                     if len(names) > 1 else "")
        is_preprocess = model.endswith("_preprocess")
        table.append((f"19{chr(ord('a') + index)}", f"resident memory, {model}: idle -> after {requests:,} requests "
                      "per family" + (", each instance" if len(names) > 1 else ""),
                      f"{max(idle[n] for n in names):.0f} -> {after[largest]:.0f} MiB ({shared[largest]:.0f} of it shared "
                      f"memory){instances}", after[largest], PREPROCESS_GOAL if is_preprocess else "reported", "MiB", failed))
    table.append((f"19{chr(ord('a') + len(order))}", f"resident memory, the whole stack ({len(processes)} processes, "
                  f"shared pages counted in each): idle -> after {requests:,} requests per family", f"{sum(idle.values()):.0f} -> "
                  f"{sum(after.values()):.0f} MiB", sum(after.values()), "reported", "MiB", failed))
    table.append(real_vocabulary_row(f"19{chr(ord('a') + len(order) + 1)}"))
    return table


def rows_on_a_new_stack(servers: list, requests: int = 1000) -> list[tuple]:
    """Rows 19 on a stack started for them (its idle reading comes before any request), stopped after;
    `servers`: the bench's, so that a stopped bench stops them too."""
    from perf.bench import BENCH, KEY, free_port, launch, triton
    from vlm_serving.deploy.stack import GatewayProcess
    from vlm_serving.deploy.triton_server import stop_all

    server = triton("memory_row", servers)
    gateway = GatewayProcess(triton_url=server.grpc_url, address=f"127.0.0.1:{free_port()}", metrics_port=free_port(),
                             log_path=BENCH / "gateway_memory_row.log", extra_env={"VLM_API_KEYS": KEY})
    try:
        launch(gateway, servers)
        gateway.wait_serving(60)
        return rows(gateway, server, KEY, requests)
    finally:
        stop_all((gateway, server))
        for process in (gateway, server):
            if process in servers:
                servers.remove(process)


def main(argv: list[str] | None = None) -> int:
    from perf.bench import KEY, rows_over_one_gateway

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per family between the two readings")
    args = parser.parse_args(argv)
    rows_over_one_gateway("memory_row", lambda gateway, server: rows(gateway, server, KEY, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
