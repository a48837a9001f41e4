"""Statistics shared by the benchmarks (no dependencies: perf/engine.py runs on the bare GPU machine)."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it
    (p50 of 1..100 is 50, p99 of 100 values the 99th)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]
