"""Rows 15 of `make bench` (also alone): the front door under hostile traffic, on a real gateway.

    .venv/bin/python -m perf.front_door_row

15a: how much the gateway's resident memory grows while it refuses 10 concurrent gzip-compressed
Generate calls that carry no key (about 60 KiB each on the wire, 60 MiB inflated): the key is
checked before a message is read, so they should cost nothing (before issue 23: +732 MiB).
15b, 15c: how long the gateway takes to refuse a flood of parts over HTTP (1,000,000 empty text parts,
26 MB: refused unparsed; 200,000 parts, 5 MB: parsed off the event loop, counted before validation),
from the body's last byte to the answer. tests/integration/test_front_door.py asserts the same
measurements against their bounds.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

MiB = 1024 * 1024


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


class PeakResident:
    """Samples a process's resident memory every few milliseconds while in use; `.peak` is the most seen."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.running = pid, resident_bytes(pid), True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes(self.pid))
            time.sleep(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def anonymous_flood(address: str, pid: int, calls: int = 10, inflated_mib: int = 60) -> tuple[int, int, list]:
    """(idle resident bytes, growth at the peak, each call's status code) for `calls` concurrent
    compressed calls without a key."""
    bomb = vlm_pb2.GenerateRequest(model="pixtral", messages=[vlm_pb2.Message(
        role="user", parts=[vlm_pb2.Part(text="a" * (inflated_mib * MiB))])])
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)],
                               compression=grpc.Compression.Gzip) as channel:
        generate = vlm_pb2_grpc.VisionLanguageServiceStub(channel).Generate
        try:  # warm the connection and the refusal path
            generate(vlm_pb2.GenerateRequest(model="pixtral"), timeout=30)
        except grpc.RpcError:
            pass
        idle = resident_bytes(pid)
        with PeakResident(pid) as memory, ThreadPoolExecutor(calls) as pool:
            outcomes = [pool.submit(generate.future(bomb, timeout=120).exception) for _ in range(calls)]
            codes = [outcome.result().code() if outcome.result() else grpc.StatusCode.OK for outcome in outcomes]
    return idle, memory.peak - idle, codes


def parts_flood(count: int) -> bytes:
    return json.dumps({"model": "pixtral", "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]
                                                         * count}]}).encode()


def post_chat(address: str, body: bytes, key: str) -> tuple[int, dict, float]:
    """POST a chat completion: (status, JSON body, seconds from the body's last byte to the
    answer: the gateway's own time)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        sent = time.monotonic()
        response = connection.getresponse()
        took = time.monotonic() - sent
        return response.status, json.loads(response.read()), took
    finally:
        connection.close()


def rows(gateway, key: str) -> list[tuple]:
    """Rows 15a-c of `make bench`'s table, measured on `gateway` (a GatewayProcess)."""
    from perf.bench import progress

    progress("row 15: the front door under hostile traffic")
    idle, grew, codes = anonymous_flood(gateway.address, gateway.process.pid)
    refused = all(code == grpc.StatusCode.UNAUTHENTICATED for code in codes)
    found = [("15a", "gateway resident memory growth refusing 10 gzip calls without a key (60 MiB inflated each)",
              f"+{grew / MiB:.1f} MiB over {idle / MiB:.0f} MiB idle", grew / MiB, "<= 100 MiB", "MiB",
              "" if refused else f"not every call was refused UNAUTHENTICATED: {codes}")]
    for name, parts, expected in (("15b", 1_000_000, 413), ("15c", 200_000, 400)):
        body = parts_flood(parts)
        status, _, took = post_chat(gateway.http_address, body, key)
        found.append((name, f"HTTP part flood refused, {parts:,} empty text parts ({len(body) / 1e6:.0f} MB), "
                            "body's last byte to the answer", f"{status} in {took:.3f} s", took, "< 1 s", "s",
                      "" if status == expected else f"answered {status}, not {expected}"))
    return found


def main() -> int:
    from perf.bench import KEY, rows_over_one_gateway

    rows_over_one_gateway("front_door_row", lambda gateway, server: rows(gateway, KEY))
    return 0

if __name__ == "__main__":
    sys.exit(main())
