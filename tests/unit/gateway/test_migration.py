"""Stream migration in the pool, over scripted servers that continue an answer from the tokens
delivered (tests/integration/test_migration.py kills real Triton servers mid-stream)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from gateway import migration
from gateway.migration import MigrationPolicy
from gateway.triton_pool import TritonPool
from tests.unit.gateway.test_triton_pool import BROKEN, READY
from vlm_serving.ensemble_client import ResponseChunk
from vlm_serving.pipelines import serving_models

# One answer, a token per chunk.
ANSWER = [ResponseChunk("Hel", [1]), ResponseChunk("lo", [2]), ResponseChunk(" wor", [3]),
          ResponseChunk("ld", [4], True, "stop", completion_tokens=4)]


class Continuing:
    """A server that answers ANSWER after the tokens it is given as a continuation; the first
    `failures["calls"]` calls to any server of the pool fail after `failures["after"]` chunks."""

    def __init__(self, address, failures):
        self.address, self.index, self.failures = address, list(READY), failures
        self.calls: list[dict] = []

    async def generate(self, ensemble, *args, **kwargs):
        self.calls.append(dict(kwargs, ensemble=ensemble))
        fails = self.failures["calls"] > 0
        self.failures["calls"] -= 1
        rest = ANSWER[len(kwargs.get("continuation", ())):]
        for sent, chunk in enumerate(rest):
            if fails and sent == self.failures["after"]:
                raise BROKEN
            yield chunk

    async def server_live(self):
        return True

    async def repository_index(self):
        return self.index

    async def close(self):
        pass


def pool_of(*addresses, policy=MigrationPolicy(), calls=1, after=1) -> tuple[TritonPool, dict[str, Continuing]]:
    """A pool whose first `calls` calls fail after `after` chunks each."""
    servers, failures = {}, {"calls": calls, "after": after}

    def make(address):
        servers[address] = Continuing(address, failures)
        return servers[address]

    return TritonPool(",".join(addresses), make, migration=policy), servers


async def stream(pool, ensemble="pixtral") -> list[ResponseChunk]:
    return [chunk async for chunk in pool.generate(ensemble, [], [], None, "r")]


def test_a_stream_whose_server_fails_goes_on_on_another_from_the_tokens_delivered():
    async def main():
        pool, servers = pool_of("a:1", "b:1", after=2)
        await pool.probe()
        chunks = await stream(pool)
        assert "".join(c.text for c in chunks) == "Hello world" and [c.token_ids for c in chunks] == [[1], [2], [3], [4]]
        first, second = sorted(servers.values(), key=lambda server: len(server.calls[0].get("continuation", [])))
        assert "continuation" not in first.calls[0] and second.calls[0]["continuation"] == [1, 2]
        assert chunks[-1].finished and chunks[-1].completion_tokens == 4
        assert pool.migration_counts.counts == {("pixtral", migration.MIGRATED): 1}

    asyncio.run(main())


def test_migrations_stop_at_the_limit_and_the_caller_is_told_why():
    async def main():
        pool, servers = pool_of("a:1", "b:1", "c:1", "d:1", policy=MigrationPolicy(max_migrations=2), calls=4)
        await pool.probe()
        received = []
        with pytest.raises(InferenceServerException) as failed:
            async for chunk in pool.generate("pixtral", [], [], None, "r"):
                received.append(chunk.text)
        assert received == ["Hel", "lo", " wor"], "each server added one chunk, none was repeated"
        assert str(failed.value.status()) == str(grpc.StatusCode.UNAVAILABLE)
        assert "continued on another server 2 time(s) already" in failed.value.message()
        assert sorted(len(s.calls) for s in servers.values()) == [0, 1, 1, 1]
        assert pool.migration_counts.counts == {("pixtral", migration.MIGRATED): 2,
                                                ("pixtral", migration.LIMIT): 1}

    asyncio.run(main())


def test_no_migration_when_the_deadline_leaves_less_than_the_reserve():
    async def main():
        pool, servers = pool_of("a:1", "b:1", policy=MigrationPolicy(reserve_s=5.0))
        await pool.probe()
        migration.deadline_var.set(asyncio.get_running_loop().time() + 3.0)
        with pytest.raises(InferenceServerException, match=r"its deadline leaves \d\.\d\ds, less than the 5s"):
            await stream(pool)
        assert sum(len(s.calls) for s in servers.values()) == 1
        assert pool.migration_counts.counts == {("pixtral", migration.DEADLINE): 1}

    asyncio.run(main())


QWEN_HELD = {"family": "qwen2_5_vl", "model_version": "1", "confidence": -2.0, "completion_tokens": 4, "error": ""}


def routed(route_on_every_chunk: bool):
    """Model auto over Continuing's answer: Pixtral answers after Qwen's doubtful held answer, each
    response saying the route so far (`route_on_every_chunk`; else, as servers before it, the family alone)."""
    answer = Continuing.generate

    async def generate(self, ensemble, *args, **kwargs):
        async for chunk in answer(self, ensemble, *args, **kwargs):
            if ensemble == "auto":
                route = {"family": "pixtral"}
                if route_on_every_chunk or chunk.finished:
                    route |= {"reason": "low_confidence", "attempts": [QWEN_HELD] + (
                        [dict(QWEN_HELD, family="pixtral", confidence=-0.5)] if chunk.finished else [])}
                chunk = ResponseChunk(chunk.text, chunk.token_ids, chunk.finished, chunk.finish_reason,
                                      completion_tokens=chunk.completion_tokens, route=route)
            yield chunk
    return generate


def test_a_stream_of_model_auto_goes_on_in_its_answering_familys_ensemble_with_its_route(monkeypatch):
    async def main():
        pool, servers = pool_of("a:1", "b:1", after=2)
        for server in servers.values():
            server.index = [{"name": name, "version": "1", "state": "READY"}
                            for name in {*serving_models("auto"), *serving_models("pixtral")}]
        await pool.probe()
        chunks = [chunk async for chunk in pool.generate("auto", [], [], None, "r", None, {"fallback": True})]
        assert "".join(c.text for c in chunks) == "Hello world"
        continued = next(call for s in servers.values() for call in s.calls if "continuation" in call)
        assert continued["ensemble"] == "pixtral" and continued["continuation"] == [1, 2]
        assert continued["routing"] is None, "a family's own ensemble takes no routing options"
        assert all(chunk.route["family"] == "pixtral" for chunk in chunks)
        final = chunks[-1].route
        assert final["reason"] == "low_confidence"
        assert [a["family"] for a in final["attempts"]] == ["qwen2_5_vl", "pixtral"]
        assert final["attempts"][1]["completion_tokens"] == 4
        assert pool.migration_counts.counts == {("auto", migration.MIGRATED): 1}

    monkeypatch.setattr(Continuing, "generate", routed(route_on_every_chunk=True))
    asyncio.run(main())


def test_answers_whose_route_is_unknown_or_with_no_other_server_are_not_migrated(monkeypatch):
    async def main():
        pool, servers = pool_of("a:1", "b:1")
        for server in servers.values():
            server.index = [{"name": name, "version": "1", "state": "READY"} for name in serving_models("auto")]
        await pool.probe()
        with pytest.raises(InferenceServerException, match="model auto's responses did not say their route"):
            await stream(pool, "auto")
        alone, _ = pool_of("a:1")
        await alone.probe()
        with pytest.raises(InferenceServerException, match="no other server can take it"):
            await stream(alone)
        assert alone.migration_counts.counts == {("pixtral", migration.NO_SERVER): 1}

    monkeypatch.setattr(Continuing, "generate", routed(route_on_every_chunk=False))
    asyncio.run(main())


def test_a_stream_failing_before_any_text_is_retried_whole():
    async def main():
        pool, servers = pool_of("a:1", "b:1", after=0)
        await pool.probe()
        chunks = await stream(pool)
        assert "".join(c.text for c in chunks) == "Hello world"
        assert all("continuation" not in call for s in servers.values() for call in s.calls)
        assert not pool.migration_counts.counts

    asyncio.run(main())
