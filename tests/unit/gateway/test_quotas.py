"""Per-key quotas and fair sharing: the rules with an injected clock, then the refusals as callers see
them over real gRPC (RetryInfo, QuotaFailure) and HTTP (429, retry-after, through the openai SDK)."""

import asyncio

import grpc
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.keys import KeyEntry, Limits
from gateway.quotas import BUSY_RETRY_S, Quotas
from tests.unit.gateway.test_keys import Clock, add_key
from tests.unit.gateway.test_servicer import request, run


def key(name="ci-bot", **limits) -> KeyEntry:
    return KeyEntry(name, limits=Limits(**limits))


def test_a_burst_over_the_rate_is_refused_with_a_retry_delay_and_under_the_rate_never():
    clock = Clock()
    quotas = Quotas(clock=clock)
    bot = key(requests_per_second=2, burst=4)
    for _ in range(4):  # the burst, at once
        assert quotas.admit(bot, "pixtral") is None
        quotas.release(bot, "pixtral")
    refusal = quotas.admit(bot, "pixtral")
    assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refusal.limit == "requests_per_second"
    assert refusal.retry_after_s == pytest.approx(0.5)  # one request's worth at 2 a second
    assert refusal.quota_violations == [("ci-bot", "requests_per_second: over 2 requests per second (burst 4)")]
    clock.now += refusal.retry_after_s
    assert quotas.admit(bot, "pixtral") is None
    quotas.release(bot, "pixtral")
    for _ in range(1000):  # at the rate, for 500 s: never refused
        clock.now += 0.5
        assert quotas.admit(bot, "pixtral") is None
        quotas.release(bot, "pixtral")


def test_the_burst_defaults_to_one_seconds_worth_and_keys_do_not_share_buckets():
    clock = Clock()
    quotas = Quotas(clock=clock)
    bot, other = key(requests_per_second=3), key("other", requests_per_second=3)
    assert [quotas.admit(bot, "m") is None for _ in range(4)] == [True, True, True, False]
    assert quotas.admit(other, "m") is None


def test_concurrent_requests_over_the_limit_are_refused_until_one_ends():
    quotas = Quotas(clock=Clock())
    bot = key(max_concurrent=2)
    assert quotas.admit(bot, "pixtral") is None and quotas.admit(bot, "qwen2.5-vl") is None
    refusal = quotas.admit(bot, "pixtral")
    assert refusal.limit == "max_concurrent" and refusal.retry_after_s == BUSY_RETRY_S
    quotas.release(bot, "qwen2.5-vl")
    assert quotas.admit(bot, "pixtral") is None


def test_generated_tokens_are_charged_after_the_answer_and_refuse_while_over():
    clock = Clock()
    quotas = Quotas(clock=clock)
    bot = key(tokens_per_minute=600)  # 10 a second
    assert quotas.admit(bot, "pixtral") is None
    quotas.release(bot, "pixtral")
    quotas.charge(bot, 500)
    assert quotas.admit(bot, "pixtral") is None  # 100 left: admitted (an answer's length is not known before)
    quotas.release(bot, "pixtral")
    quotas.charge(bot, 300)  # 200 over
    refusal = quotas.admit(bot, "pixtral")
    assert refusal.limit == "tokens_per_minute" and refusal.retry_after_s == pytest.approx(20.1)  # to 1 token
    clock.now += 20.1
    assert quotas.admit(bot, "pixtral") is None


def test_a_greedy_key_that_filled_the_capacity_cannot_keep_a_polite_key_out():
    quotas = Quotas(capacity=4, clock=Clock())
    greedy, polite = key("greedy"), key("polite")
    for _ in range(4):  # alone, the greedy key may fill the model
        assert quotas.admit(greedy, "pixtral") is None
    refusal = quotas.admit(greedy, "pixtral")
    assert refusal.limit == "fair_share" and refusal.retry_after_s == BUSY_RETRY_S
    assert refusal.quota_violations[0][0] == "greedy"
    assert quotas.admit(polite, "pixtral") is None  # served although the model is full
    assert quotas.admit(polite, "pixtral") is None  # up to its share of 4 / 2
    assert quotas.admit(polite, "pixtral").limit == "fair_share"
    assert quotas.admit(greedy, "qwen2.5-vl") is None  # another model is not full
    for _ in range(2):  # the greedy key's requests end: while the model is full, not beyond its share of 2
        quotas.release(greedy, "pixtral")
        assert quotas.admit(greedy, "pixtral").limit == "fair_share"
    quotas.release(greedy, "pixtral")  # 3 in flight: the model is no longer full
    assert quotas.admit(greedy, "pixtral") is None


def test_quota_limits_follow_the_key_file_by_name():
    quotas = Quotas(clock=Clock())
    assert quotas.admit(key(max_concurrent=1), "m") is None
    assert quotas.admit(key(max_concurrent=1), "m").limit == "max_concurrent"
    assert quotas.admit(key(max_concurrent=2), "m") is None  # the file raised the limit: in flight is kept
    old, new = key(requests_per_second=1, burst=2), key(requests_per_second=1, burst=3)
    assert quotas.admit(old, "m") is None and quotas.admit(old, "m") is None
    assert quotas.admit(new, "m").limit == "requests_per_second"  # a rotation's other limits refill nothing


def quota_details(error):
    status = rpc_status.from_call(error)
    retry, failures = None, []
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.ToTimedelta().total_seconds()
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            failures += [(v.subject, v.description) for v in failure.violations]
    return retry, failures


def test_over_the_rate_grpc_answers_resource_exhausted_with_retry_info_and_quota_failure(tmp_path):
    path = tmp_path / "keys.jsonl"
    bot = add_key(path, "ci-bot", "--requests-per-second", "0.01", "--burst", "2")
    metadata = (("authorization", f"Bearer {bot}"),)

    async def test(stub, backend, gw, channel):
        for _ in range(2):
            assert (await stub.Generate(request(), metadata=metadata)).text == "Hello"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "API key 'ci-bot'" in caught.value.details()
        retry, failures = quota_details(caught.value)
        assert 95 < retry <= 100  # one request's worth at 0.01 a second, less the time since the last
        assert failures == [("ci-bot", "requests_per_second: over 0.01 requests per second (burst 2)")]
        assert len(backend.calls) == 2  # the refused request never reached the model
        sample = gw.metrics.registry.get_sample_value
        assert sample("vlm_quota_refusals_total", {"key": "ci-bot", "limit": "requests_per_second"}) == 1
        assert sample("vlm_key_requests_total", {"key": "ci-bot", "code": "RESOURCE_EXHAUSTED"}) == 1

    run(test, api_keys_file=str(path))


def test_answers_tokens_count_against_tokens_per_minute(tmp_path):
    path = tmp_path / "keys.jsonl"
    bot = add_key(path, "ci-bot", "--tokens-per-minute", "2")
    metadata = (("authorization", f"Bearer {bot}"),)

    async def test(stub, backend, gw, channel):
        answer = await stub.Generate(request(), metadata=metadata)
        assert answer.usage.completion_tokens == 2
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request(), metadata=metadata)
        retry, failures = quota_details(caught.value)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and 0 < retry <= 60
        assert failures[0][1].startswith("tokens_per_minute:")

    run(test, api_keys_file=str(path))


def test_the_polite_key_is_served_while_the_greedy_key_holds_the_whole_capacity(tmp_path):
    path = tmp_path / "keys.jsonl"
    greedy, polite = add_key(path, "greedy"), add_key(path, "polite")

    async def test(stub, backend, gw, channel):
        release = asyncio.Event()
        scripted = type(backend).generate

        async def generate(ensemble, messages, *args, **kwargs):
            if messages[0]["content"][0]["text"] == "hold":
                await release.wait()
            async for chunk in scripted(backend, ensemble, messages, *args, **kwargs):
                yield chunk

        backend.generate = generate
        as_greedy = (("authorization", f"Bearer {greedy}"),)
        held = [asyncio.ensure_future(stub.Generate(request(text="hold"), metadata=as_greedy)) for _ in range(2)]
        while gw.servicer.in_flight < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request(text="hold"), metadata=as_greedy)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_details(caught.value)[1][0][1].startswith("fair_share: model 'pixtral' is at its capacity of 2")
        answer = await stub.Generate(request(), metadata=(("authorization", f"Bearer {polite}"),))
        assert answer.text == "Hello" and not any(call.done() for call in held)
        release.set()
        assert [(await call).text for call in held] == ["Hello", "Hello"]

    run(test, api_keys_file=str(path), model_capacity=2)


def test_over_a_limit_http_answers_429_with_retry_after_in_openai_shape(tmp_path):
    path = tmp_path / "keys.jsonl"
    bot = add_key(path, "ci-bot", "--requests-per-second", "0.01")

    async def test(stub, backend, gw, channel):
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key=bot, max_retries=0)
        ask = [{"role": "user", "content": "hi"}]
        await client.chat.completions.create(model="pixtral", messages=ask)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="pixtral", messages=ask)
        assert caught.value.status_code == 429
        assert 95 <= int(caught.value.response.headers["retry-after"]) <= 100  # 100 s a request, less the time since
        assert caught.value.code == "resource_exhausted" and caught.value.type == "rate_limit_error"
        assert "API key 'ci-bot'" in caught.value.message and "requests per second" in caught.value.message
        with pytest.raises(openai.AuthenticationError):  # a wrong key is still 401
            await openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key=bot + "x",
                                     max_retries=0).chat.completions.create(model="pixtral", messages=ask)
        await client.close()

    run(test, api_keys_file=str(path))
