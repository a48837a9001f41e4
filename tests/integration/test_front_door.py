"""The front door under hostile traffic, on the real gateway process: callers without a key cost no
memory, floods of parts are refused at once, and limits hold over both APIs."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import httpx2 as httpx
import pytest
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway.errors import field_violations
from perf.front_door_row import MiB, anonymous_flood, parts_flood, post_chat
from tests.integration.conftest import KEY, start_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def front_door(triton, tmp_path_factory):
    gateway = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("front-door"))
    yield gateway
    gateway.stop()


def stub_of(channel) -> vlm_pb2_grpc.VisionLanguageServiceStub:
    return vlm_pb2_grpc.VisionLanguageServiceStub(channel)


def test_anonymous_compressed_calls_cost_the_gateway_no_memory(front_door):
    # Each call is about 60 KiB on the wire and 60 MiB once inflated; none carries a key.
    idle, grew, codes = anonymous_flood(front_door.address, front_door.process.pid)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 10, codes
    print(f"gateway resident memory: idle {idle / MiB:.0f} MiB, peak under the flood +{grew / MiB:.1f} MiB")
    assert grew < 100 * MiB, f"the gateway grew by {grew / MiB:.0f} MiB refusing calls without a key"


def test_a_message_over_the_size_limit_is_refused_before_it_is_parsed(front_door):
    # With a key, a 100 MiB (inflated) message is over the receive limit: refused by gRPC itself.
    huge = vlm_pb2.GenerateRequest(model="pixtral", messages=[vlm_pb2.Message(
        role="user", parts=[vlm_pb2.Part(text="a" * (100 * MiB))])])
    with grpc.insecure_channel(front_door.address, options=[("grpc.max_send_message_length", -1)],
                               compression=grpc.Compression.Gzip) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub_of(channel).Generate(huge, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value


def test_a_flood_of_parts_is_refused_at_once_over_grpc(front_door):
    flood = vlm_pb2.GenerateRequest(model="pixtral", messages=[vlm_pb2.Message(
        role="user", parts=[vlm_pb2.Part(text="")] * 200_000)])
    with grpc.insecure_channel(front_door.address) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub_of(channel).Generate(flood, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
        took = time.monotonic() - started
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("messages[0].parts", "200000 parts is over the limit of 64 per message") in field_violations(refused.value)
    assert took < 1.0, took


def test_empty_text_parts_are_refused(front_door):
    request = vlm_pb2.GenerateRequest(model="pixtral", messages=[vlm_pb2.Message(
        role="user", parts=[vlm_pb2.Part(text="Hi"), vlm_pb2.Part(text="")])])
    with grpc.insecure_channel(front_door.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub_of(channel).Generate(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(refused.value)] == ["messages[0].parts[1].text"]


@pytest.mark.parametrize("parts,status,param", [
    # 26 MB of structure and no image: refused unparsed.
    (1_000_000, 413, None),
    # Under the size bound: parsed off the event loop, its counts checked before it is validated.
    (200_000, 400, "messages[0].content"),
])
def test_a_flood_of_parts_is_refused_at_once_over_http_without_stalling_others(front_door, parts, status, param):
    body = parts_flood(parts)  # built before the clock starts: it holds this process's interpreter
    stalls, done = [], threading.Event()
    health = httpx.Client(base_url=f"http://{front_door.http_address}", timeout=10)
    health.get("/health")  # connected before the clock starts

    def probe_health():  # the event loop stays free: /health answers while the flood is parsed
        while not done.is_set():
            started = time.monotonic()
            health.get("/health")
            stalls.append(time.monotonic() - started)
            time.sleep(0.01)

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    answered, reply, took = post_chat(front_door.http_address, body, KEY)
    done.set()
    prober.join()
    health.close()
    assert answered == status and reply["error"]["param"] == param, (answered, reply)
    assert took < 1.0, f"refused after {took:.2f}s"
    assert max(stalls) < 0.5, f"/health waited {max(stalls):.2f}s while the flood was parsed"


def test_http_refuses_a_caller_without_a_key_before_reading_the_body(front_door):
    # 50 MB declared, a few bytes sent: the refusal comes at once, without waiting for the body.
    host, port = front_door.http_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 50000000\r\n\r\n{\"model\":")
        reply = connection.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 401"), reply
