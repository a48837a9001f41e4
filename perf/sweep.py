"""Concurrency sweeps with perf_analyzer against each ensemble of a running Triton (`make up`).

    .venv/bin/python -m perf.sweep [--url 127.0.0.1:8001] [--concurrency 1,2,4,8,16] [--max-tokens 16]

For every ensemble and mode (STREAM false: one response with the whole answer; STREAM true: a
response per delta) it writes perf_analyzer's CSV to build/perf/sweeps/<ensemble>_<mode>.csv and
prints throughput and p50 per concurrency. Needs `make perf-tools`.

In both modes perf_analyzer (2.48, `--streaming`) times a request to its final response, never to
the first delta: at c=1, 64 tokens, pixtral, stream p50 123 ms against unary 91 ms and 24 ms for a
1-token stream (`--concurrency 1 --max-tokens 1` and `64`). Time to first text comes from
`perf.load` (`make bench`, row 4).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys

from perf.workload import perf_analyzer_input, workload
from vlm_serving.deploy.triton_server import BUILD

PERF_ANALYZER = BUILD / "perf" / "bin" / "perf_analyzer"
OUT = BUILD / "perf" / "sweeps"


def sweep(url: str, ensemble: str, stream: bool, levels: list[int], max_tokens: int) -> list[dict]:
    mode = "stream" if stream else "unary"
    data = perf_analyzer_input(workload(16), max_tokens, stream, OUT / f"input_{ensemble}_{mode}.json")
    csv_path = OUT / f"{ensemble}_{mode}.csv"
    rows = []
    for level in levels:  # one run per level: perf_analyzer's CSV holds the last level only
        part = OUT / f"{ensemble}_{mode}_c{level}.csv"
        command = [str(PERF_ANALYZER), "-m", ensemble, "-u", url, "-i", "grpc", "--streaming",
                   "--input-data", str(data), "--concurrency-range", f"{level}:{level}",
                   "--measurement-interval", "4000", "--stability-percentage", "50", "-f", str(part)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed for {ensemble} {mode} c={level}:\n{result.stdout[-2000:]}")
        rows += list(csv.DictReader(part.open()))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ensembles", default="qwen2_5_vl,pixtral")
    args = parser.parse_args()
    if not PERF_ANALYZER.exists():
        print("perf_analyzer is not installed: run `make perf-tools`", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    levels = [int(level) for level in args.concurrency.split(",")]
    print("| ensemble | mode | concurrency | infer/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ensemble in args.ensembles.split(","):
        for stream in (False, True):
            for row in sweep(args.url, ensemble, stream, levels, args.max_tokens):
                print(f"| {ensemble} | {'stream' if stream else 'unary'} | {row['Concurrency']} | "
                      f"{float(row['Inferences/Second']):.1f} | {int(row['p50 latency']) / 1000:.0f} | "
                      f"{int(row['p99 latency']) / 1000:.0f} |")
    print(f"CSV files: {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
