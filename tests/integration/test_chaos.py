"""Callers who give up or stop reading never fail anyone else: the real gateway and Triton under abuse.

Steady clients send small requests while impatient clients send 12 MB images with deadlines of
20 to 110 ms (they give up while their request is being written) and stalled clients open long
streams, read one message and stop reading. Before the gateway's fix this failed a third of the
steady requests (UNAVAILABLE "RPC already finished", DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import io
import random
import threading
import time
import urllib.request
from collections import Counter

import grpc
import numpy as np
import pytest
from PIL import Image
from vlm.v1 import vlm_pb2_grpc

from tests.integration.conftest import KEY, PNG, start_gateway
from vlm_client import build_request

pytestmark = pytest.mark.integration
METADATA = (("authorization", f"Bearer {KEY}"),)
SECONDS = 15


def big_png() -> bytes:
    """About 12 MB: noise does not compress."""
    pixels = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_impatient_and_stalled_callers_never_fail_steady_ones(triton, tmp_path):
    big = build_request("pixtral", "What is this?", [big_png()], max_tokens=8)
    assert big.ByteSize() > 12_000_000
    small = build_request("pixtral", "What is in the picture?", [PNG], max_tokens=8)
    long_stream = build_request("qwen2.5-vl", "Tell me a long story", max_tokens=4000)
    stop = time.monotonic() + SECONDS
    steady, impatient, stalled = Counter(), Counter(), Counter()
    lock = threading.Lock()

    def record(counter, code):
        with lock:
            counter[code.name] += 1

    def steady_client():
        with grpc.insecure_channel(gateway.address) as channel:
            stub = vlm_pb2_grpc.VisionLanguageServiceStub(channel)
            while time.monotonic() < stop:
                try:
                    answer = stub.Generate(small, metadata=METADATA, timeout=60)
                    record(steady, grpc.StatusCode.OK if answer.usage.completion_tokens == 8 else grpc.StatusCode.DATA_LOSS)
                except grpc.RpcError as error:
                    record(steady, error.code())

    def impatient_client(seed):
        rng = random.Random(seed)
        with grpc.insecure_channel(gateway.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = vlm_pb2_grpc.VisionLanguageServiceStub(channel)
            while time.monotonic() < stop:
                try:
                    stub.Generate(big, metadata=METADATA, timeout=rng.uniform(0.02, 0.11))
                    record(impatient, grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    record(impatient, error.code())
                time.sleep(0.1)

    def stalled_client():
        with grpc.insecure_channel(gateway.address) as channel:
            stub = vlm_pb2_grpc.VisionLanguageServiceStub(channel)
            while time.monotonic() < stop:
                stream = stub.GenerateStream(long_stream, metadata=METADATA, timeout=4)
                try:
                    next(stream)
                    time.sleep(5)  # stop reading, past the deadline
                    for _ in stream:
                        pass
                    record(stalled, grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    record(stalled, error.code())

    gateway = start_gateway(triton.grpc_url, tmp_path)
    threads = ([threading.Thread(target=steady_client) for _ in range(3)]
               + [threading.Thread(target=impatient_client, args=(seed,)) for seed in range(3)]
               + [threading.Thread(target=stalled_client) for _ in range(2)])
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SECONDS + 90)
        print(f"chaos: steady {dict(steady)}, impatient {dict(impatient)}, stalled {dict(stalled)}")
        assert set(steady) == {"OK"}, steady
        assert steady["OK"] >= 3 * 3, steady  # every steady client was served, again and again
        assert set(impatient) <= {"DEADLINE_EXCEEDED", "OK"} and impatient["DEADLINE_EXCEEDED"] > 0, impatient
        assert set(stalled) <= {"DEADLINE_EXCEEDED", "OK"} and stalled, stalled
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
