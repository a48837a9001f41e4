"""Callers who give up or stop reading never fail anyone else: the real gateway and Triton under abuse.

Steady clients send small requests while impatient clients send 12 MB images with deadlines of
20 to 110 ms (they give up while their request is being written or preprocessed) and stalled clients
open long streams, read one message and stop reading (the traffic of perf/chaos_row.py, `make bench`
row 16). Before the gateway's fix (issue 11) this failed a third of the steady requests (UNAVAILABLE
"RPC already finished", DEADLINE_EXCEEDED). Before issue 24 every abandoned 12 MB image that reached
Triton was still decoded: the steady requests' latency is printed here and recorded in
perf/RESULTS.md, never asserted (it depends on the machine); what is asserted is that the steps
before generation skipped abandoned requests.
"""

from __future__ import annotations

import time
import urllib.request

import pytest

from perf.chaos_row import run_chaos, skipped_requests
from tests.integration.conftest import KEY, start_gateway

pytestmark = pytest.mark.integration
SECONDS = 15


def test_impatient_and_stalled_callers_never_fail_steady_ones(triton, tmp_path):
    gateway = start_gateway(triton.grpc_url, tmp_path)
    triton_metrics = f"http://{triton.address}:{triton.metrics_port}/metrics"
    try:
        skipped_before = sum(skipped_requests(triton_metrics).values())
        seen = run_chaos(gateway.address, KEY, SECONDS, stalled=2)
        skipped = sum(skipped_requests(triton_metrics).values()) - skipped_before
        print(f"chaos: {seen.summary()}; preprocess/embed skipped {skipped:g} abandoned requests")
        assert set(seen.steady) == {"OK"}, seen.steady
        assert seen.steady["OK"] >= 3 * 3, seen.steady  # every steady client was served, again and again
        assert set(seen.impatient) <= {"DEADLINE_EXCEEDED", "OK"} and seen.impatient["DEADLINE_EXCEEDED"] > 0, \
            seen.impatient
        assert set(seen.stalled) <= {"DEADLINE_EXCEEDED", "OK"} and seen.stalled, seen.stalled
        # Abandoned 12 MB images reached Triton and were answered without being decoded.
        assert skipped > 0, "no abandoned request was skipped by the steps before generation"
        # Nothing is left behind: every abandoned request has ended in the gateway.
        metrics = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(metrics, timeout=5).read().decode()
            if all(line.endswith(" 0.0") for line in text.splitlines() if line.startswith("vlm_requests_in_flight{")):
                break
            time.sleep(0.2)
        assert all(line.endswith(" 0.0") for line in text.splitlines() if line.startswith("vlm_requests_in_flight{")), text
    finally:
        gateway.stop()
