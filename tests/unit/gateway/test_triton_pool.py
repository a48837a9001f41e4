"""The gateway's pool of Triton servers, over scripted servers: who gets each request, failover only
before any text, ejection and return, DNS membership, the pool's view of the repository
(tests/integration/test_pool.py runs the same against real Triton servers)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from gateway.errors import ApiError
from gateway.migration import MigrationPolicy
from gateway.triton_pool import TritonPool, parse_targets
from vlm_serving.ensemble_client import ResponseChunk
from vlm_serving.pipelines import pipeline

READY = [{"name": name, "version": "1", "state": "READY"} for name in pipeline("pixtral")]
BROKEN = InferenceServerException("the stream to Triton failed: UNAVAILABLE: Socket closed",
                                  status=str(grpc.StatusCode.UNAVAILABLE))


class Scripted:
    """A server: answers with `chunks`, failing with `error` after `fail_after` of them; `hold` keeps
    every request open until set (to see requests outstanding)."""

    def __init__(self, address):
        self.address, self.live, self.index = address, True, list(READY)
        self.chunks = [ResponseChunk("Hel", [1], False), ResponseChunk("lo", [2], True, "stop")]
        self.error, self.fail_after, self.hold = None, 0, None
        self.requests, self.loaded, self.closed, self.ended = 0, [], False, 0

    async def generate(self, ensemble, *args, **kwargs):
        self.requests += 1
        try:
            if self.hold is not None:
                await self.hold.wait()
            for sent, chunk in enumerate(self.chunks):
                if self.error is not None and sent == self.fail_after:
                    raise self.error
                yield chunk
        finally:  # where TritonBackend cancels an unfinished request in Triton
            self.ended += 1

    async def server_live(self):
        if not self.live:
            raise InferenceServerException("failed to connect to all addresses", status=str(grpc.StatusCode.UNAVAILABLE))
        return True

    async def repository_index(self):
        return self.index

    async def model_parameters(self, name):
        return {"server": self.address}

    async def load_model(self, name):
        if name == "broken":
            raise InferenceServerException(f"failed to load '{name}' on {self.address}")
        self.loaded.append(name)

    async def close(self):
        self.closed = True


def pool_of(*addresses, **options) -> tuple[TritonPool, dict[str, Scripted]]:
    servers = {}

    def make(address):
        servers[address] = Scripted(address)
        return servers[address]

    return TritonPool(",".join(addresses) if addresses else options.pop("url"), make, **options), servers


async def answer(pool, ensemble="pixtral") -> str:
    return "".join([chunk.text async for chunk in pool.generate(ensemble, [], [], None, "r")])


def test_targets_are_a_list_or_a_dns_name():
    assert parse_targets("a:8001, b:8001") == (["a:8001", "b:8001"], None)
    assert parse_targets("dns:///triton-headless.vlm.svc:8001") == ([], ("triton-headless.vlm.svc", 8001))
    for bad in ("", "dns:///nameonly", "dns:///:8001"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_idle_servers_take_turns_and_a_busy_one_is_passed_over():
    async def main():
        pool, servers = pool_of("a:1", "b:1", "c:1")
        await pool.probe()
        for _ in range(9):
            assert await answer(pool) == "Hello"
        assert [s.requests for s in servers.values()] == [3, 3, 3]
        servers["a:1"].hold = asyncio.Event()
        servers["b:1"].hold = asyncio.Event()
        held = [asyncio.create_task(answer(pool)) for _ in range(2)]  # one each on the least loaded
        await asyncio.sleep(0.05)
        assert sorted(server.outstanding for server in pool.servers.values()) == [0, 1, 1]
        before = servers["c:1"].requests
        await answer(pool)  # the only idle one
        assert servers["c:1"].requests == before + 1
        servers["a:1"].hold.set()
        servers["b:1"].hold.set()
        await asyncio.gather(*held)
        assert all(server.outstanding == 0 for server in pool.servers.values())

    asyncio.run(main())


def test_a_server_failing_before_any_text_is_ejected_and_the_request_goes_to_another():
    async def main():
        pool, servers = pool_of("a:1", "b:1")
        await pool.probe()
        servers["a:1"].error = BROKEN
        assert await answer(pool) == "Hello" and await answer(pool) == "Hello"
        assert not pool.servers["a:1"].healthy and "Socket closed" in pool.servers["a:1"].last_error
        assert servers["a:1"].requests == 1  # ejected at once: no second request went there
        servers["a:1"].error = None
        await pool.probe()  # answers its probe again: back in the pool
        assert pool.servers["a:1"].healthy

    asyncio.run(main())


def test_with_migration_off_a_stream_that_had_begun_fails_unavailable_and_is_never_repeated():
    """VLM_MAX_MIGRATIONS=0 (tests/unit/gateway/test_migration.py: the stream goes on elsewhere)."""
    async def main():
        pool, servers = pool_of("a:1", "b:1", migration=MigrationPolicy(max_migrations=0))
        await pool.probe()
        for server in servers.values():
            server.error, server.fail_after = BROKEN, 1
        received = []
        with pytest.raises(InferenceServerException) as failed:
            async for chunk in pool.generate("pixtral", [], [], None, "r"):
                received.append(chunk.text)
        assert received == ["Hel"] and "after the answer had begun" in failed.value.message()
        assert str(failed.value.status()) == str(grpc.StatusCode.UNAVAILABLE)
        assert sum(server.requests for server in servers.values()) == 1

    asyncio.run(main())


def test_errors_of_the_request_itself_are_not_retried():
    async def main():
        pool, servers = pool_of("a:1", "b:1")
        await pool.probe()
        for server in servers.values():
            server.error = InferenceServerException("in ensemble 'pixtral', Exceeds maximum queue size")
        with pytest.raises(InferenceServerException, match="queue size"):
            await answer(pool)
        assert sum(server.requests for server in servers.values()) == 1
        assert all(server.healthy for server in pool.servers.values())

    asyncio.run(main())


@pytest.mark.parametrize("message", [
    "Request for unknown model: 'pixtral' is not found",
    # As Triton says it of a step inside the ensemble, with the request's id in front.
    "[request id: r.1f] in ensemble 'pixtral', Request for unknown model: 'pixtral_generate' version 1 is not at ready state",
])
def test_a_model_not_ready_on_one_server_is_asked_of_another_without_ejecting_it(message):
    async def main():
        pool, servers = pool_of("a:1", "b:1")
        await pool.probe()
        servers["a:1"].error = InferenceServerException(message)
        assert [await answer(pool) for _ in range(2)] == ["Hello", "Hello"]
        assert pool.servers["a:1"].healthy and servers["a:1"].requests >= 1

    asyncio.run(main())


def test_the_only_server_is_probed_at_once_after_a_broken_stream_not_ejected_blind():
    async def main():
        pool, servers = pool_of("a:1", resolve_s=3600)
        await pool.probe()
        servers["a:1"].error = BROKEN  # one stream breaks; the server itself is fine
        with pytest.raises(ApiError):
            await answer(pool)
        servers["a:1"].error = None
        assert pool.servers["a:1"].healthy  # kept: it answered the probe made at once
        assert await answer(pool) == "Hello"  # served before any scheduled probe
        servers["a:1"].error, servers["a:1"].live = BROKEN, False  # now it is really gone
        with pytest.raises(ApiError):
            await answer(pool)
        assert not pool.servers["a:1"].healthy

    asyncio.run(main())


def test_no_server_left_is_unavailable_with_retry_info_naming_each_server():
    async def main():
        pool, servers = pool_of("a:1", "b:1")
        servers["a:1"].live = False
        servers["b:1"].index = []  # live, but the model is not loaded there
        await pool.probe()
        with pytest.raises(ApiError) as refused:
            await answer(pool)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and refused.value.retry_after_s
        assert "a:1: not serving it (failed to connect" in refused.value.states
        assert "b:1: model not ready" in refused.value.states
        assert not pool.serves("pixtral") and await pool.server_live()  # b:1 is live, without the model

    asyncio.run(main())


def test_dns_answers_add_servers_and_retire_the_ones_that_left():
    async def main():
        answers = [["10.0.0.1:8001"], ["10.0.0.1:8001", "10.0.0.2:8001"], ["10.0.0.2:8001"]]

        async def resolver(name, port):
            assert (name, port) == ("triton", 8001)
            return answers.pop(0)

        pool, servers = pool_of(url="dns:///triton:8001", resolver=resolver, resolve_s=0)
        await pool.probe()
        assert list(pool.servers) == ["10.0.0.1:8001"]
        await pool.probe()
        assert sorted(pool.servers) == ["10.0.0.1:8001", "10.0.0.2:8001"]
        assert all(server.healthy for server in pool.servers.values())
        servers["10.0.0.1:8001"].hold = asyncio.Event()
        servers["10.0.0.2:8001"].hold = asyncio.Event()
        held = [asyncio.create_task(answer(pool)) for _ in range(2)]
        await asyncio.sleep(0.05)
        await pool.probe()  # 10.0.0.1 left the answer: retired, kept until its request ends
        assert pool.servers["10.0.0.1:8001"].retired and not servers["10.0.0.1:8001"].closed
        servers["10.0.0.1:8001"].hold.set()
        servers["10.0.0.2:8001"].hold.set()
        assert await asyncio.gather(*held) == ["Hello", "Hello"]
        answers.append(["10.0.0.2:8001"])
        await pool.probe()
        assert list(pool.servers) == ["10.0.0.2:8001"] and servers["10.0.0.1:8001"].closed

    asyncio.run(main())


def test_a_dns_failure_keeps_the_servers_known():
    async def main():
        calls = []

        async def resolver(name, port):
            calls.append(name)
            if len(calls) > 1:
                raise OSError("Temporary failure in name resolution")
            return ["10.0.0.1:8001"]

        pool, _ = pool_of(url="dns:///triton:8001", resolver=resolver, resolve_s=0)
        await pool.probe()
        await pool.probe()
        assert list(pool.servers) == ["10.0.0.1:8001"] and pool.servers["10.0.0.1:8001"].healthy

    asyncio.run(main())


def test_the_pool_index_calls_a_version_ready_only_where_every_server_has_it_ready():
    async def main():
        pool, servers = pool_of("a:1", "b:1")
        for server in servers.values():
            server.index = READY + [{"name": "pixtral_generate", "version": "2", "state": "READY"}]
        servers["b:1"].index[-1] = {"name": "pixtral_generate", "version": "2", "state": "LOADING"}
        await pool.probe()
        versions = {(e["name"], e["version"]): e for e in await pool.repository_index()}
        assert versions[("pixtral_generate", "1")]["state"] == "READY"
        lagging = versions[("pixtral_generate", "2")]
        assert lagging["state"] == "LOADING" and lagging["reason"] == "LOADING on b:1; READY on a:1"
        servers["b:1"].index[-1] = {"name": "pixtral_generate", "version": "2", "state": "READY"}
        versions = {(e["name"], e["version"]): e for e in await pool.repository_index()}
        assert versions[("pixtral_generate", "2")] == {"name": "pixtral_generate", "version": "2", "state": "READY"}

    asyncio.run(main())


def test_model_control_reaches_every_live_server_and_reports_each():
    async def main():
        pool, servers = pool_of("a:1", "b:1", "c:1")
        servers["c:1"].live = False
        await pool.probe()
        assert await pool.on_every_server("load_model", "pixtral_generate") == {"a:1": "", "b:1": ""}
        assert servers["a:1"].loaded == servers["b:1"].loaded == ["pixtral_generate"] and servers["c:1"].loaded == []
        results = await pool.on_every_server("load_model", "broken")
        assert results == {"a:1": "failed to load 'broken' on a:1", "b:1": "failed to load 'broken' on b:1"}

    asyncio.run(main())


def test_metrics_show_each_servers_health_and_load():
    from prometheus_client import CollectorRegistry

    from gateway.observability import PoolCollector

    async def main():
        pool, servers = pool_of("a:1", "b:1")
        servers["b:1"].live = False
        await pool.probe()
        registry = CollectorRegistry()
        registry.register(PoolCollector(pool))
        servers["a:1"].hold = asyncio.Event()
        held = asyncio.create_task(answer(pool))
        await asyncio.sleep(0.05)
        sample = registry.get_sample_value
        assert sample("vlm_backend_healthy", {"backend": "a:1"}) == 1 and sample("vlm_backend_healthy", {"backend": "b:1"}) == 0
        assert sample("vlm_backend_requests_in_flight", {"backend": "a:1"}) == 1
        servers["a:1"].hold.set()
        await held
        assert sample("vlm_backend_requests_in_flight", {"backend": "a:1"}) == 0

    asyncio.run(main())


def test_model_parameters_come_from_a_server_where_the_model_is_ready():
    async def main():
        pool, servers = pool_of("a:1", "b:1")
        servers["a:1"].index = []
        await pool.probe()
        assert await pool.model_parameters("pixtral_generate") == {"server": "b:1"}

    asyncio.run(main())


def test_a_caller_who_gives_up_ends_the_servers_request_at_once():
    async def main():
        pool, servers = pool_of("a:1")
        await pool.probe()
        chunks = pool.generate("pixtral", [], [], None, "r")
        assert (await anext(chunks)).text == "Hel"
        await chunks.aclose()
        assert servers["a:1"].ended == 1 and pool.servers["a:1"].outstanding == 0

    asyncio.run(main())
