"""The load generator and the bench report what they measure: ranks, failures, no division by zero."""

import asyncio

import grpc
import pytest

from perf.load import LoadResult, percentile, run_load
from perf.workload import workload


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99), percentile(values, 100)) == (
        50.0, 95.0, 99.0, 100.0)
    assert percentile([7.0], 50) == 7.0


class _Target:
    def __init__(self, failing_every: int):
        self.failing_every, self.calls = failing_every, 0

    async def call(self, item, max_tokens, stream):
        self.calls += 1
        if self.calls % self.failing_every == 0:
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "full")
        return None, max_tokens


@pytest.mark.parametrize("failing_every,ok", [(1, 0), (3, 6)])
def test_failures_are_counted_by_code_and_mark_the_bench_row(failing_every, ok):
    from perf.bench import failures

    result = asyncio.run(run_load(_Target(failing_every), workload(2, with_images=False), 2, 9, 4, warmup=0))
    assert len(result.latencies) == ok and result.completion_tokens == [4] * ok
    assert result.errors_by_code == {"RESOURCE_EXHAUSTED": 9 - ok}
    assert failures(result) == f"RESOURCE_EXHAUSTED x{9 - ok}"
    assert result.throughput >= 0 and "RESOURCE_EXHAUSTED" in result.summary()
    assert failures(LoadResult(requests=1, seconds=0.0)) == "" and LoadResult(requests=1, seconds=0.0).throughput == 0.0


def test_the_engine_benchmark_runs_both_schedulers_and_prints_its_rows(checkpoints, capsys):
    """perf/engine.py is what runs on the GPU machine (`make bench-gpu`); here at tiny size."""
    from perf.engine import main

    assert main(["--requests", "8", "--family", "pixtral", "--checkpoints", str(checkpoints)]) == 0
    table = capsys.readouterr().out
    for measure in ("throughput at saturation", "p99 latency of short requests", "p99 time to first token",
                    "engine / plain generate"):
        row = next(line for line in table.splitlines() if measure in line)
        assert float(row.split("|")[-2]) > 0, row
    cache = next(line for line in table.splitlines() if "planning the step's slots" in line)
    assert "unfilled share of the rows' blocks" in cache and 0 <= float(cache.split("|")[-2]) < 1


def test_the_bench_prints_each_row_when_it_is_measured_and_the_table_in_order_at_the_end(capsys):
    from perf.bench import Table, print_table

    table = Table()
    table.add(("9a", "second measured", "1.0 ms", 1.0, "<= 2 ms", "ms", ""))
    assert capsys.readouterr().out.splitlines()[-1] == "| 9a | second measured | 1.0 ms | 1.00 ms | <= 2 ms |"
    table.add(("1a", "first by key", "2 / 1 req/s", 2.0, ">= 0.9", "x", ""), ("2", "failed", "-", None, "x", "x", "boom"))
    assert capsys.readouterr().out.splitlines()[-2:] == ["| 1a | first by key | 2 / 1 req/s | 2.00x | >= 0.9 |",
                                                         "| 2 | failed | - | not a result: boom | x |"]
    print_table(table.rows)
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()[3:]] == ["| 1a", "| 2", "| 9a"]


def test_the_engine_before_the_paged_cache_runs_from_its_own_tree():
    from perf.engine_before import ROOT, TREE, run_measure

    assert run_measure("perf.engine_before", "before", {}) == {"engine": str(TREE / "vlm_serving/generation/engine.py")}
    assert run_measure("perf.engine_before", "now", {}) == {"engine": str(ROOT / "vlm_serving/generation/engine.py")}


def test_bench_gpu_compares_the_engines_and_generate_at_each_row_count(checkpoints, capsys):
    from perf.engines_at_rows import main

    main(["--family", "qwen2_5_vl", "--rows", "1", "3", "--prompt", "8", "--new", "3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| qwen2_5_vl |")]
    assert [line.split(" | ")[1] for line in lines] == ["1", "3"]
    for line in lines:
        rates = [float(rate) for rate in line.split(" | ")[2].split(" / ")]
        assert len(rates) == 3 and min(rates) > 0
