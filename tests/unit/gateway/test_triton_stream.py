"""The gateway's Triton streams under callers who give up, streams that die and slow links.

Over `fake_triton` (a Triton stand-in that misbehaves on demand) behind a TCP proxy that can
throttle or stall each connection.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.errors import ApiError
from gateway.triton_backend import TritonBackend, _SharedStream, to_api_error
from tests.unit.gateway.fake_triton import PARAMS, ThrottledProxy, command, start_fake_triton


def run(test, rate: float | None = None, **backend_options):
    async def main():
        server, fake, port = await start_fake_triton()
        proxy = ThrottledProxy(port, rate)
        backend = TritonBackend(f"127.0.0.1:{await proxy.start()}", **backend_options)
        try:
            await asyncio.wait_for(test(backend, fake, proxy), 30)
        finally:
            await backend.close()
            await proxy.close()
            await server.stop(0)

    asyncio.run(main())


async def collect(backend: TritonBackend, images=(), **fake_command) -> str:
    text = ""
    async for chunk in backend.generate("pixtral", command(**fake_command), list(images), PARAMS, "req"):
        text += chunk.text
    return text


def spawn(coroutine) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(coroutine)


def test_a_caller_cancelled_mid_write_ends_only_its_own_request():
    async def test(backend, fake, proxy):
        steady = [spawn(collect(backend, n=5, delay=0.05)) for _ in range(4)]
        await asyncio.sleep(0.05)
        for _ in range(5):
            impatient = spawn(collect(backend, images=[b"x" * 600_000], n=2))
            await asyncio.sleep(0)  # the task runs to its first await: where it hands over its request
            impatient.cancel()
        assert await asyncio.wait_for(asyncio.gather(*steady), 10) == ["t0 t1 t2 t3 t4 "] * 4
        assert await collect(backend, n=2) == "t0 t1 "
        assert fake.streams_opened == 1, "the shared stream must survive a caller's cancellation"

    run(test)


@pytest.mark.parametrize("ending", ["triton_hangs_up", "triton_fails_the_stream", "close", "reader_bug", "half_open"])
def test_any_end_of_the_shared_stream_fails_every_waiter_at_once_and_the_next_request_reconnects(ending, monkeypatch):
    async def test(backend, fake, proxy):
        waiters = [spawn(collect(backend, n=200, delay=0.05)) for _ in range(3)]
        await asyncio.sleep(0.3)
        if ending == "triton_hangs_up":
            spawn(collect(backend, hangup=True))
        elif ending == "triton_fails_the_stream":
            spawn(collect(backend, abort=True))
        elif ending == "close":
            backend._stream.close()
        elif ending == "reader_bug":
            def broken_route(self, response):
                raise RuntimeError("a bug in routing")
            monkeypatch.setattr(_SharedStream, "_route", broken_route)
        else:
            proxy.freeze()  # nothing passes and nothing closes: only keepalive can tell
        started = asyncio.get_running_loop().time()
        outcomes = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 8)
        waited = asyncio.get_running_loop().time() - started
        for outcome in outcomes:
            assert to_api_error(outcome, "pixtral", []).code == grpc.StatusCode.UNAVAILABLE, outcome
        # All at once: well before the 10 s the waiters' answers would have taken.
        assert waited < 5, waited
        monkeypatch.undo()
        proxy.flowing.set()
        assert await collect(backend, n=2) == "t0 t1 "

    run(test, keepalive_s=0.5)


def test_a_large_request_does_not_hold_up_small_ones():
    async def test(backend, fake, proxy):
        large = spawn(collect(backend, images=[b"x" * 3_000_000], n=1))  # about 3 s through the proxy
        await asyncio.sleep(0.3)
        assert await collect(backend, n=1) == "t0 "
        assert not large.done(), "the small request waited for the large one's bytes"
        assert await large == "t0 "

    run(test, rate=1_000_000)


def test_a_stream_whose_reader_stalls_is_failed_alone_and_cancelled_in_triton():
    async def test(backend, fake, proxy):
        stalled = backend.generate("pixtral", command(n=50), [], PARAMS, "stalled")
        assert (await anext(stalled)).text == "t0 "
        await asyncio.sleep(0.5)  # 49 more responses arrive meanwhile; 5 may wait
        with pytest.raises(ApiError) as caught:
            async for _ in stalled:
                pass
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "read it faster" in caught.value.message
        assert await collect(backend, n=3) == "t0 t1 t2 "
        for _ in range(50):
            if any(name.startswith("stalled.") for name in fake.cancelled):
                break
            await asyncio.sleep(0.02)
        assert any(name.startswith("stalled.") for name in fake.cancelled), fake.cancelled

    run(test, max_stream_backlog=5)


def test_while_triton_is_down_requests_are_refused_retryably_and_a_restarted_triton_is_reached_at_once():
    async def main():
        server, fake, port = await start_fake_triton()
        backend = TritonBackend(f"127.0.0.1:{port}", connect_timeout_s=1.0)
        try:
            assert await collect(backend, n=1) == "t0 "
            await server.stop(0)
            loop = asyncio.get_running_loop()
            outage_ends = loop.time() + 6  # long enough for gRPC's default backoff to pass 4 s
            while loop.time() < outage_ends:
                with pytest.raises(ApiError) as refused:
                    await collect(backend, n=1)
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                assert refused.value.retry_after_s is not None, "never sent: the client may retry it"
                assert "was not sent" in refused.value.message
            server, fake, _ = await start_fake_triton(port)
            started = loop.time()
            assert await collect(backend, n=1) == "t0 "
            assert loop.time() - started < 1.0
        finally:
            await backend.close()
            await server.stop(0)

    asyncio.run(asyncio.wait_for(main(), 30))
