"""Row 13 of `make bench` (also alone): the OpenAI-compatible HTTP API's throughput / gRPC's, same gateway.

    .venv/bin/python -m perf.http_row [--quick]
"""

from __future__ import annotations

import argparse
import sys

from perf.bench import KEY, alternate, load, progress, rows_over_one_gateway, throughputs
from perf.load import GatewayTarget, HttpTarget
from perf.workload import workload
from vlm_serving.deploy.stack import GatewayProcess


def row(gateway: GatewayProcess, images, requests: int) -> tuple:
    """HTTP then gRPC, three rounds, same requests, c=16: a row of `make bench`'s table."""
    progress("row 13: three rounds of HTTP, then gRPC")
    pairs, ratio, failed = alternate(
        lambda: load(lambda: HttpTarget(f"http://{gateway.http_address}", KEY, "qwen2.5-vl"), images, 16, requests, 16),
        lambda: load(lambda: GatewayTarget(gateway.address, KEY, "qwen2.5-vl"), images, 16, requests, 16))
    return ("13", "OpenAI HTTP / gRPC throughput through the same gateway, c=16, 16 tokens, same requests",
            throughputs(pairs), ratio, ">= 0.9", "x", failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, noisier)")
    args = parser.parse_args(argv)
    rows_over_one_gateway("http_row", lambda gateway, server: [row(gateway, workload(16), 32 if args.quick else 96)])
    return 0

if __name__ == "__main__":
    sys.exit(main())
