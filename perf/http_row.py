"""Row 13 of `make bench` alone: the OpenAI-compatible HTTP API's throughput / gRPC's, same gateway.

    .venv/bin/python -m perf.http_row [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from perf.bench import BENCH, KEY, failures, free_port, load, progress, triton
from perf.load import GatewayTarget, HttpTarget
from perf.workload import workload
from vlm_serving.deploy.stack import GatewayProcess, stop_on_signals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, noisier)")
    args = parser.parse_args(argv)
    requests = 32 if args.quick else 96
    stop_on_signals()
    BENCH.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        server = triton("http_row", servers)
        gateway = GatewayProcess(triton_url=server.grpc_url, address=f"127.0.0.1:{free_port()}", metrics_port=free_port(),
                                 log_path=BENCH / "gateway_http_row.log", http_address=f"127.0.0.1:{free_port()}",
                                 extra_env={"VLM_API_KEYS": KEY})
        gateway.start()
        servers.append(gateway)
        gateway.wait_serving(60)
        images = workload(16)
        pairs = []
        for round_ in range(3):
            progress(f"row 13: round {round_ + 1} of 3 (HTTP, then gRPC)")
            pairs.append((load(lambda: HttpTarget(f"http://{gateway.http_address}", KEY, "qwen2.5-vl"), images, 16, requests, 16),
                          load(lambda: GatewayTarget(gateway.address, KEY, "qwen2.5-vl"), images, 16, requests, 16)))
        failed = failures(*(side for pair in pairs for side in pair))
        ratio = statistics.median(a.throughput / b.throughput for a, b in pairs)
        print("| # | measure | measured | ratio | goal |\n| --- | --- | --- | --- | --- |")
        measured = " ; ".join(f"{a.throughput:.1f}/{b.throughput:.1f}" for a, b in pairs)
        print(f"| 13 | OpenAI HTTP / gRPC throughput through the same gateway, c=16, 16 tokens, same requests | "
              f"{measured} req/s | {'not a result: ' + failed if failed else f'{ratio:.2f}x'} | >= 0.9 |")
    finally:
        for process in reversed(servers):
            process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
