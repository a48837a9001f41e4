"""The OpenAI-compatible HTTP API in-process, driven by the official `openai` SDK, over the scripted
Triton stand-in of test_servicer (the real stack: tests/integration/test_openai_api.py)."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx2 as httpx
import openai
import pytest
from tritonclient.utils import InferenceServerException

from tests.conftest import encode, picture
from tests.unit.gateway.test_servicer import run
from vlm_serving.ensemble_client import ResponseChunk

PNG = encode(picture(32, 24))
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
IMAGES = [{"kind": "photo", "width": 32, "height": 24}]


def sdk(gw, key="secret") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key=key, max_retries=0)


def ask(text="What is it?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL, "detail": "low"}},
                                         {"type": "text", "text": text}]}]


def test_a_chat_completion_with_a_base64_image_is_the_grpc_request_and_answer():
    async def test(stub, backend, gw, channel):
        answer = await sdk(gw).chat.completions.create(model="pixtral", messages=ask(), max_tokens=7, temperature=0.5,
                                                       seed=3, stop=["END"])
        assert answer.choices[0].message.content == "Hello" and answer.choices[0].finish_reason == "length"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (12, 2, 14)
        assert answer.model == "pixtral" and answer.id.startswith("chatcmpl-")
        assert answer.model_extra["vlm"]["confidence"] == pytest.approx(-0.5)
        assert answer.model_extra["vlm"]["route"]["images"] == [{"kind": "IMAGE_KIND_DIAGRAM", "width": 448, "height": 336}]
        ensemble, messages, images, params = backend.calls[0]
        assert ensemble == "pixtral" and images == [PNG] and backend.details == ["low"]
        assert messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        assert (params.max_tokens, params.temperature, params.seed, params.stop) == (7, 0.5, 3, ("END",))

    run(test)


def test_a_stream_sends_server_sent_deltas_that_join_to_the_answer_and_usage_when_asked():
    async def test(stub, backend, gw, channel):
        chunks = [chunk async for chunk in await sdk(gw).chat.completions.create(
            model="pixtral", messages=ask(), stream=True, stream_options={"include_usage": True})]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "length"]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 14
        assert backend.calls[0][3].stream

    run(test)


def test_formats_and_tools_translate_and_a_call_comes_back_as_openai_tool_calls():
    async def test(stub, backend, gw, channel):
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        await sdk(gw).chat.completions.create(model="pixtral", messages=ask(), response_format={
            "type": "json_schema", "json_schema": {"name": "count", "schema": schema}})
        assert backend.calls[-1][3].response_format.type == "json_schema"
        assert json.loads(backend.calls[-1][3].response_format.schema) == schema
        call = '[TOOL_CALLS][{"name":"zoom","arguments":{"box":[1,2,3,4]}}]'
        backend.script = [ResponseChunk(call, [1], True, "stop", 12, 2, 0, -0.5, "1", IMAGES)]
        tool = {"type": "function", "function": {"name": "zoom", "parameters": {
            "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}}}, "required": ["box"]}}}
        answer = await sdk(gw).chat.completions.create(model="pixtral", messages=ask(), tools=[tool],
                                                       tool_choice={"type": "function", "function": {"name": "zoom"}})
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls[0].function.name == "zoom"
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {"box": [1, 2, 3, 4]}
        assert backend.calls[-1][3].response_format.type == "tool_call"

    run(test)


def test_models_health_and_the_openapi_document():
    async def test(stub, backend, gw, channel):
        models = await sdk(gw).models.list()
        assert {model.id for model in models.data} == {"qwen2.5-vl", "pixtral", "auto"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}") as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
            document = (await client.get("/openapi.json")).json()
            assert "/v1/chat/completions" in document["paths"] and "/v1/models" in document["paths"]
            assert (await client.get("/v1/models")).status_code == 401, "the key is needed"

    run(test)


@pytest.mark.parametrize("call, error, status, param", [
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), n=2), openai.BadRequestError, 400, "n"),
    (lambda c: c.chat.completions.create(model="gpt-4o", messages=ask()), openai.NotFoundError, 404, None),
    (lambda c: c.chat.completions.create(model="pixtral", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
     openai.BadRequestError, 400, "messages[0].parts[0].image.data"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]),
     openai.BadRequestError, 400, "messages[0].content[0].image_url.url"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), temperature=9), openai.BadRequestError, 400,
     "config.temperature"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=[{"role": "tool", "content": "42",
                                                                      "tool_call_id": "x"}]),
     openai.BadRequestError, 400, "messages[0].role"),
])
def test_errors_arrive_as_the_sdks_typed_exceptions_with_their_status_and_field(call, error, status, param):
    async def test(stub, backend, gw, channel):
        with pytest.raises(error) as caught:
            await call(sdk(gw))
        assert caught.value.status_code == status
        assert caught.value.body["param"] == param, caught.value.body

    run(test)


def test_a_bad_key_an_oversized_body_a_full_queue_and_a_down_server_have_their_codes():
    async def test(stub, backend, gw, channel):
        with pytest.raises(openai.AuthenticationError):
            await sdk(gw, key="wrong").chat.completions.create(model="pixtral", messages=ask())
        with pytest.raises(openai.APIStatusError) as too_big:
            await sdk(gw).chat.completions.create(model="pixtral", messages=ask("x" * 5000))
        assert too_big.value.status_code == 413 and "over the limit of 4000 bytes" in too_big.value.message
        backend.script = [InferenceServerException("in ensemble 'pixtral', Exceeds maximum queue size")]
        with pytest.raises(openai.RateLimitError):
            await sdk(gw).chat.completions.create(model="pixtral", messages=[{"role": "user", "content": "hi"}])
        backend.script = [InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")]
        with pytest.raises(openai.InternalServerError) as down:
            await sdk(gw).chat.completions.create(model="pixtral", messages=[{"role": "user", "content": "hi"}])
        assert down.value.status_code == 503

    run(test, max_request_bytes=4000)


def test_a_stream_read_slowly_holds_its_generation_and_ends_at_its_deadline():
    """The events wait in a queue of VLM_MAX_STREAM_BACKLOG: a reader that stalls holds up its own
    generation (memory stays bounded) until the deadline ends it, as on gRPC."""
    async def test(stub, backend, gw, channel):
        # Far more than the socket buffers hold: the gateway must wait for the reader.
        backend.script = [ResponseChunk("x" * 50_000, [1], False)] * 400 + [ResponseChunk("end", [2], True, "stop")]
        body = {"model": "pixtral", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        events = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers={"Authorization": "Bearer secret"}) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        if len(events) == 1:
                            await asyncio.sleep(2)  # a reader that stalls past the 1 s deadline
        assert events[-1] == "[DONE]" and len(events) < 402
        error = json.loads(events[-2])["error"]
        assert error["code"] == "deadline_exceeded" or "deadline" in error["message"], error
        sample = gw.metrics.registry.get_sample_value
        assert sample("vlm_requests_total", {"model": "pixtral", "method": "GenerateStream",
                                             "code": "DEADLINE_EXCEEDED"}) == 1

    run(test, default_timeout_s=1.0, max_stream_backlog=4)
