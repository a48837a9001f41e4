"""The in-flight media budget: many concurrent large requests cannot make the gateway hold more than
VLM_MAX_INFLIGHT_MEDIA_BYTES of images and videos; the refused get RESOURCE_EXHAUSTED with RetryInfo
(HTTP 429 with retry-after) and the bytes come back when requests end, whichever way they end."""

import asyncio
import base64
import contextvars
import ipaddress

import grpc
import httpx2 as httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from vlm.v1 import vlm_pb2

from gateway.errors import ApiError
from gateway.media_budget import MediaBudget, hold_more, media_bytes
from gateway.settings import Settings, SettingsError
from tests.conftest import encode, http_host, picture, serving_file
from tests.unit.gateway.test_servicer import KEY, request, run

IMAGE = encode(picture(160, 120, seed=5))  # about 58 KB of noisy PNG


def with_image(data: bytes = IMAGE, url: str = "") -> vlm_pb2.GenerateRequest:
    asked = request()
    image = vlm_pb2.Image(url=url) if url else vlm_pb2.Image(data=data)
    asked.messages[0].parts.append(vlm_pb2.Part(image=image))
    return asked


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


async def until(condition, timeout_s: float = 10.0) -> None:
    """Wait for `condition()` to hold (the requests under test have arrived), at most `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def hold_generation(backend) -> asyncio.Event:
    """Make every generation wait for the returned event: its request stays in flight, holding its images."""
    released = asyncio.Event()
    generate = backend.generate

    async def held(*args, **kwargs):
        await released.wait()
        async for chunk in generate(*args, **kwargs):
            yield chunk

    backend.generate = held
    return released


def test_a_reservation_is_refused_past_the_limit_and_returned_however_the_request_ends():
    budget = MediaBudget(100)
    with budget.hold() as first:
        first.cover(60)
        first.cover(40)  # already covered: nothing more
        assert budget.held == 60
        def another_request():
            with budget.hold() as second:
                assert second is not first
                second.add(30)
                second.add(20)  # 110 > 100

        with pytest.raises(ApiError) as refused:
            contextvars.Context().run(another_request)  # a request of its own (an RPC's own context)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.retry_after_s > 0
        assert "VLM_MAX_INFLIGHT_MEDIA_BYTES" in refused.value.message
        assert budget.held == 60, "the refused request's own 30 bytes came back"
        with budget.hold() as nested:  # the same request (e.g. its URL fetches): one reservation
            assert nested is first
            hold_more(10)
        assert budget.held == 70, "the inner hold ended; the request still holds its bytes"
    assert budget.held == 0

    async def cancelled():
        with budget.hold():
            hold_more(50)
            await asyncio.sleep(10)

    async def main():
        task = asyncio.ensure_future(cancelled())
        await asyncio.sleep(0.01)
        assert budget.held == 50
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert budget.held == 0

    asyncio.run(main())
    hold_more(10**9)  # outside any request: nothing is counted
    assert budget.held == 0


def test_media_bytes_counts_image_and_video_data_not_text():
    asked = with_image(b"x" * 1000)
    asked.messages[0].parts.append(vlm_pb2.Part(video=vlm_pb2.Video(data=b"y" * 500)))
    asked.messages[0].parts.append(vlm_pb2.Part(image=vlm_pb2.Image(url="http://example.com/a.png")))
    assert media_bytes(asked) == 1500


def test_concurrent_large_grpc_requests_beyond_the_budget_are_refused_with_retry_info():
    """Today's defect: nothing bounds the images held by requests in flight together."""
    async def test(stub, backend, gw, channel):
        released = hold_generation(backend)
        calls = [asyncio.ensure_future(stub.Generate(with_image(), metadata=KEY, timeout=30)) for _ in range(5)]
        await until(lambda: sum(call.done() for call in calls) == 2)  # two refused while three are held
        assert gw.servicer.media.held == 3 * len(IMAGE)
        released.set()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(refused) == 2, outcomes
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "VLM_MAX_INFLIGHT_MEDIA_BYTES" in error.details() and retry_delay(error) == pytest.approx(1.0)
        assert gw.servicer.media.held == 0, "every request gave its bytes back"
        # Once they ended, the budget is whole again: three at once are served.
        served = await asyncio.gather(*[stub.Generate(with_image(), metadata=KEY, timeout=30) for _ in range(3)])
        assert [answer.text for answer in served] == ["Hello"] * 3

    run(test, max_inflight_media_bytes=3 * len(IMAGE) + 100)


def test_fetched_image_urls_count_as_they_arrive():
    big = encode(picture(200, 150, seed=6))
    with http_host(serving_file(big)) as host:
        async def test(stub, backend, gw, channel):
            released = hold_generation(backend)
            first = asyncio.ensure_future(stub.Generate(with_image(url=f"http://{host}/a.png"), metadata=KEY, timeout=30))
            await until(lambda: gw.servicer.media.held == len(big))  # fetched and held
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(with_image(url=f"http://{host}/b.png"), metadata=KEY, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            released.set()
            assert (await first).text == "Hello"
            assert gw.servicer.media.held == 0

        run(test, max_inflight_media_bytes=len(big) + len(big) // 2, image_url_allowlist=(host,),
            image_url_allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))


def test_an_http_body_is_reserved_from_its_content_length_and_refused_with_429():
    data_url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    body = {"model": "pixtral", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": data_url}}]}]}

    async def test(stub, backend, gw, channel):
        released = hold_generation(backend)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30,
                                     headers={"authorization": "Bearer secret"}) as client:
            first = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
            await until(lambda: gw.servicer.media.held >= len(data_url))  # the body's Content-Length is held
            refused = await client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 429, refused.text
            assert "VLM_MAX_INFLIGHT_MEDIA_BYTES" in refused.json()["error"]["message"]
            assert refused.headers["retry-after"] == "1" and refused.headers["x-should-retry"] == "true"
            released.set()
            assert (await first).status_code == 200
            assert gw.servicer.media.held == 0

    run(test, max_inflight_media_bytes=len(data_url) + 50_000)


def test_the_budget_setting_is_read_and_must_fit_the_largest_request():
    env = {"VLM_API_KEYS": "k"}
    assert Settings.from_env(env).max_inflight_media_bytes == 1024 ** 3
    assert Settings.from_env({**env, "VLM_MAX_INFLIGHT_MEDIA_BYTES": "500000000"}).max_inflight_media_bytes == 500_000_000
    with pytest.raises(SettingsError, match="VLM_MAX_INFLIGHT_MEDIA_BYTES"):
        Settings.from_env({**env, "VLM_MAX_INFLIGHT_MEDIA_BYTES": "1000"})
