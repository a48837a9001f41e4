"""Row 14 of `make bench` (also alone): throughput of a gateway over two Triton servers / over one,
same machine, same requests, c=16.

    .venv/bin/python -m perf.pool_row [--quick]

Both servers run on this machine's cores: where one server already keeps every core busy, a second
adds no compute, only scheduling (the ratio then says what the pool costs, not what it scales to).
"""

from __future__ import annotations

import argparse
import sys

from perf.bench import BENCH, KEY, alternate, free_port, launch, load, print_table, progress, throughputs, triton
from perf.load import GatewayTarget
from perf.workload import workload
from vlm_serving.deploy.stack import GatewayProcess, stop_on_signals
from vlm_serving.deploy.triton_server import stop_all

MEASURE = "throughput, gateway over two Triton servers / over one, same machine, c=16, 16 tokens"
GOAL = "reported (2 cores: both servers share them)"


def gateway_over(triton_url: str, name: str, servers: list) -> GatewayProcess:
    gateway = GatewayProcess(triton_url=triton_url, address=f"127.0.0.1:{free_port()}", metrics_port=free_port(),
                             log_path=BENCH / f"gateway_{name}.log", extra_env={"VLM_API_KEYS": KEY})
    launch(gateway, servers)
    gateway.wait_serving(60)
    return gateway


def row(one: GatewayProcess, first_server, servers: list, images, requests: int, env: dict | None = None) -> tuple:
    """Start a second server (with `env` added to its environment) and a gateway over both;
    alternate loads on it and on `one` (a gateway over `first_server` alone). A row of `make bench`'s table."""
    second = triton("pool_second", servers, env)
    pooled = gateway_over(f"{first_server.grpc_url},{second.grpc_url}", "pool", servers)
    try:
        progress("row 14: three rounds of two servers, then one")
        pairs, ratio, failed = alternate(
            lambda: load(lambda: GatewayTarget(pooled.address, KEY, "qwen2.5-vl"), images, 16, requests, 16),
            lambda: load(lambda: GatewayTarget(one.address, KEY, "qwen2.5-vl"), images, 16, requests, 16))
    finally:  # the rows after this one run beside one server, as before
        stop_all((pooled, second))
        for process in (pooled, second):
            servers.remove(process)
    return ("14", MEASURE, throughputs(pairs), ratio, GOAL, "x", failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, noisier)")
    parser.add_argument("--threads-per-server", type=int,
                        help="OMP_NUM_THREADS and MKL_NUM_THREADS of each server (default: the libraries' own, one per core)")
    args = parser.parse_args(argv)
    env = ({"OMP_NUM_THREADS": str(args.threads_per_server), "MKL_NUM_THREADS": str(args.threads_per_server)}
           if args.threads_per_server else None)
    stop_on_signals()
    BENCH.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        first = triton("pool_first", servers, env)
        one = gateway_over(first.grpc_url, "pool_one", servers)
        print_table([row(one, first, servers, workload(16), 32 if args.quick else 96, env)])
    finally:
        stop_all(reversed(servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
