"""Rows 19 of `make bench` (also alone): resident memory of every process of the stack (issue 26).

    .venv/bin/python -m perf.memory_row [--requests 1000]

One Triton server (the CPU profile) and a gateway over it. Each process's resident memory (VmRSS) is
read at idle (every model loaded, no request yet) and again after `requests` requests per family
through the gateway (c=16, 1 token each, the bench's 16 pictures of 8 sizes): Triton's Python-backend
stubs by model (each instance's figure listed), Triton itself, the gateway, and the whole stack.
Goal for the preprocessing instances (issue 26): <= 100 MiB at idle, <= 150 MiB after 1,000 requests;
the rest is reported. The preprocessing and embed steps import neither torch nor transformers
(tests/unit/test_lean_preprocessing.py asserts the modules; this measures the memory).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from perf.front_door_row import MiB, resident_bytes

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
    return table


def main(argv: list[str] | None = None) -> int:
    from perf.bench import KEY, rows_over_one_gateway

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per family between the two readings")
    args = parser.parse_args(argv)
    rows_over_one_gateway("memory_row", lambda gateway, server: rows(gateway, server, KEY, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
