"""The OpenAI-compatible HTTP API in-process, driven by the official `openai` SDK, over the scripted
Triton stand-in of test_servicer (the real stack: tests/integration/test_openai_api.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import httpx2 as httpx
import openai
import pytest
from tritonclient.utils import InferenceServerException

from tests.conftest import encode, picture
from tests.unit.gateway.test_servicer import KEY, request, run
from vlm_serving import tasks
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
        assert answer.usage.prompt_tokens_details.cached_tokens == 0
        assert answer.model == "pixtral" and answer.id.startswith("chatcmpl-")
        assert answer.model_extra["vlm"]["confidence"] == pytest.approx(-0.5)
        assert answer.model_extra["vlm"]["route"]["images"] == [{"kind": "IMAGE_KIND_DIAGRAM", "width": 448, "height": 336}]
        ensemble, messages, images, params = backend.calls[0]
        assert ensemble == "pixtral" and images == [PNG] and backend.details == ["low"]
        assert messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        assert (params.max_tokens, params.temperature, params.seed, params.stop) == (7, 0.5, 3, ("END",))

    run(test)


def test_prompt_tokens_the_prefix_cache_held_are_reported_as_openai_does():
    async def test(stub, backend, gw, channel):
        backend.script = [ResponseChunk("Hello", [1, 2], True, "stop", 40, 2, 4, -0.5, "1", IMAGES, cached_tokens=32)]
        answer = await sdk(gw).chat.completions.create(model="pixtral", messages=ask())
        assert answer.usage.prompt_tokens == 40 and answer.usage.prompt_tokens_details.cached_tokens == 32
        chunks = [chunk async for chunk in await sdk(gw).chat.completions.create(
            model="pixtral", messages=ask(), stream=True, stream_options={"include_usage": True})]
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32
        reply = await stub.Generate(request("pixtral", "hi"), metadata=KEY)
        assert (reply.usage.prompt_tokens, reply.usage.cached_tokens) == (40, 32)

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
            assert set(document["paths"]) == {"/v1/chat/completions", "/v1/models", "/v1/models/{model_id}", "/health"}
            assert (await client.get("/v1/models")).status_code == 401, "the key is needed"
            # Every reference resolves; every route's errors are documented; the key is declared.
            text = json.dumps(document)
            refs = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
            assert refs and refs <= set(document["components"]["schemas"]), refs - set(document["components"]["schemas"])
            chat = document["paths"]["/v1/chat/completions"]["post"]
            assert {"400", "401", "404", "413", "429", "500", "503", "504"} <= set(chat["responses"])
            assert chat["security"] == [{"bearer": []}] and "422" not in chat["responses"]
            body = document["components"]["schemas"]["ChatCompletionRequest"]
            assert {"messages", "model", "logprobs", "top_logprobs", "presence_penalty"} <= set(body["properties"])
            assert (await client.get("/docs")).status_code == 404, "no page that loads scripts from a CDN"

    run(test)


def server_sent_events(text: str) -> list[dict]:
    """A text/event-stream body as a client parses it: one {field: value} per event."""
    events = []
    for block in text.strip().split("\n\n"):
        event = {}
        for line in block.splitlines():
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")
        events.append(event)
    return events


def test_every_streamed_event_is_what_the_openapi_document_says():
    """The text/event-stream schema describes one event (OpenAPI 3.1, as Schemathesis reads it): text,
    logprobs, a tool call, usage, an error after text was sent and [DONE] all validate, their data
    against the chunk or error schema it names."""
    import jsonschema

    def entry(text, logprob):
        return {"token": text, "bytes": list(text.encode()), "logprob": logprob,
                "top_logprobs": [{"token": text, "bytes": list(text.encode()), "logprob": logprob}]}

    async def test(stub, backend, gw, channel):
        call = '[TOOL_CALLS][{"name":"zoom","arguments":{"box":[1,2,3,4]}}]'
        tool = {"type": "function", "function": {"name": "zoom", "parameters": {
            "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}}}}}}
        scripts = {
            "text, logprobs and usage": ([ResponseChunk("Hel", [1], False, logprobs=[entry("Hel", -0.25)]),
                                          ResponseChunk("lo", [2], True, "length", 12, 2, 4, -0.5, "3", IMAGES,
                                                        logprobs=[entry("lo", -0.5)])],
                                         {"logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True}}),
            "a tool call": ([ResponseChunk(call, [1], True, "stop", 12, 2, 0, -0.5, "1", IMAGES)], {"tools": [tool]}),
            "an error after text": ([ResponseChunk("Hel", [1], False),
                                     InferenceServerException("in ensemble 'pixtral', Exceeds maximum queue size")], {}),
        }
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}") as client:
            document = (await client.get("/openapi.json")).json()
            event_schema = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"][
                "text/event-stream"]["schema"]
            # The data's own schema (contentSchema is an annotation to a JSON Schema validator), with
            # the document's components beside it so that its references resolve.
            payload_schema = dict(event_schema["properties"]["data"]["else"]["contentSchema"],
                                  components=document["components"])
            for name, (script, fields) in scripts.items():
                backend.script = script
                response = await client.post("/v1/chat/completions", headers={"Authorization": "Bearer secret"},
                                             json={"model": "pixtral", "messages": ask(), "stream": True, **fields})
                assert response.status_code == 200, (name, response.text)
                events = server_sent_events(response.text)
                assert events[-1] == {"data": "[DONE]"}, name
                for event in events:
                    jsonschema.validate(event, event_schema)
                    if event["data"] != "[DONE]":
                        jsonschema.validate(json.loads(event["data"]), payload_schema)
                kinds = [json.loads(event["data"]) for event in events[:-1]]
                if name == "an error after text":
                    assert "error" in kinds[-1], kinds
                if name == "a tool call":
                    assert kinds[-1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "zoom"

    run(test)


@pytest.mark.parametrize("call, error, status, param", [
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), n=2), openai.BadRequestError, 400, "n"),
    (lambda c: c.chat.completions.create(model="gpt-4o", messages=ask()), openai.NotFoundError, 404, None),
    (lambda c: c.chat.completions.create(model="pixtral", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
     openai.BadRequestError, 400, "messages[0].content[0].image_url.url"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]),
     openai.BadRequestError, 400, "messages[0].content[0].image_url.url"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), temperature=9), openai.BadRequestError, 400,
     "temperature"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=[{"role": "tool", "content": "42",
                                                                      "tool_call_id": "x"}]),
     openai.BadRequestError, 400, "messages[0].tool_call_id"),
    # Every error names the field as the caller wrote it, not the gRPC API's path.
    (lambda c: c.chat.completions.create(model="pixtral", messages=[{"role": "user", "content": ""}]),
     openai.BadRequestError, 400, "messages[0].content"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), max_completion_tokens=99999),
     openai.BadRequestError, 400, "max_completion_tokens"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), tools=[
        {"type": "function", "function": {"name": "bad name"}}]), openai.BadRequestError, 400, "tools[0].function.name"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), seed=2**70), openai.BadRequestError, 400,
     "seed"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), logit_bias={"5": 10}),
     openai.BadRequestError, 400, "logit_bias"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), extra_body={"best_of": 3}),
     openai.BadRequestError, 400, "best_of"),
    (lambda c: c.chat.completions.create(model="pixtral", messages=ask(), top_logprobs=3), openai.BadRequestError,
     400, "top_logprobs"),
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
        # 4/3 of the message limit: images travel as base64 in JSON.
        assert too_big.value.status_code == 413 and "over the limit of 5333 bytes" in too_big.value.message
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


def test_unset_max_tokens_and_vllms_extra_sampling_fields_reach_the_engine():
    async def test(stub, backend, gw, channel):
        await sdk(gw).chat.completions.create(model="pixtral", messages=ask(), presence_penalty=0.5,
                                              frequency_penalty=-0.25, extra_body={"top_k": 5, "repetition_penalty": 1.1})
        params = backend.calls[-1][3]
        assert params.max_tokens is None  # until the answer or the context ends, not 64
        assert (params.top_k, params.presence_penalty, params.frequency_penalty) == (5, 0.5, -0.25)
        assert params.repetition_penalty == pytest.approx(1.1)

    run(test)


def test_a_task_over_http_has_its_default_max_tokens_and_a_cut_answer_no_result():
    """As over gRPC: the task's own max_tokens when the body sets none; a cut answer says so in
    vlm.result_error, with no vlm.result; boxes outside the image are counted in the result."""
    async def test(stub, backend, gw, channel):
        whole = '[{"bbox_2d": [1, 2, 10, 12], "label": "cat"}, {"bbox_2d": [40, 30, 50, 40], "label": "ghost"}]'
        backend.script = [ResponseChunk(whole, [1], True, "stop", 12, 2, 4, -0.5, "1", IMAGES)]
        answer = await sdk(gw).chat.completions.create(model="qwen2.5-vl", messages=ask("cats"),
                                                       extra_body={"vlm": {"task": "grounding"}})
        assert backend.calls[-1][3].max_tokens == tasks.DEFAULT_MAX_TOKENS["grounding"]
        assert answer.model_extra["vlm"]["result"] == {"detections": {
            "detections": [{"label": "cat", "box": {"x_min": 1, "y_min": 2, "x_max": 10, "y_max": 12}}],
            "boxes_outside": 1}}
        backend.script = [ResponseChunk(whole, [1], True, "length", 12, 2, 4, -0.5, "1", IMAGES)]
        for stream in (False, True):
            answer = await sdk(gw).chat.completions.create(model="qwen2.5-vl", messages=ask("cats"), max_tokens=2,
                                                           stream=stream, extra_body={"vlm": {"task": "grounding"}})
            final = [chunk async for chunk in answer][-1] if stream else answer
            assert final.choices[0].finish_reason == "length" and "result" not in final.model_extra["vlm"]
            assert final.model_extra["vlm"]["result_error"].startswith(
                "max_tokens cut the answer before its grounding result was complete")
        assert backend.calls[-1][3].max_tokens == 2

    run(test)


def test_retry_headers_tell_the_sdk_what_it_may_retry():
    async def test(stub, backend, gw, channel):
        retrying = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key="secret", max_retries=2)
        hi = [{"role": "user", "content": "hi"}]
        # A refusal that did no work: retried, after the time the service gives.
        backend.script = [InferenceServerException("in ensemble 'pixtral', Exceeds maximum queue size")]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}") as client:
            reply = await client.post("/v1/chat/completions", headers={"Authorization": "Bearer secret"},
                                      json={"model": "pixtral", "messages": hi})
        assert reply.status_code == 429 and reply.headers["x-should-retry"] == "true"
        assert reply.headers["retry-after-ms"] == "500"
        calls = len(backend.calls)
        with pytest.raises(openai.RateLimitError):
            await retrying.chat.completions.create(model="pixtral", messages=hi)
        assert len(backend.calls) - calls == 3
        # Work that may have run (a deadline, a failure mid-answer): never repeated by the SDK.
        for error in (InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"),
                      InferenceServerException("in ensemble 'pixtral', INTERNAL: boom")):
            backend.script = [ResponseChunk("Hel", [1], False), error]
            calls = len(backend.calls)
            with pytest.raises(openai.InternalServerError) as failed:
                await retrying.chat.completions.create(model="pixtral", messages=hi)
            assert failed.value.response.headers["x-should-retry"] == "false"
            assert len(backend.calls) - calls == 1, "the SDK repeated work that had run"

    run(test)


def test_request_ids_come_back_in_a_header():
    async def test(stub, backend, gw, channel):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}") as client:
            mine = await client.post("/v1/chat/completions", headers={"Authorization": "Bearer secret",
                                                                      "x-request-id": "trace-42"},
                                     json={"model": "pixtral", "messages": [{"role": "user", "content": "hi"}]})
            assert mine.headers["x-request-id"] == "trace-42" and mine.json()["id"] == "chatcmpl-trace-42"
            refused = await client.get("/v1/models")
            assert refused.status_code == 401 and len(refused.headers["x-request-id"]) == 32

    run(test)


def test_a_model_can_be_retrieved():
    async def test(stub, backend, gw, channel):
        model = await sdk(gw).models.retrieve("qwen2.5-vl")
        assert (model.id, model.object) == ("qwen2.5-vl", "model")
        with pytest.raises(openai.NotFoundError):
            await sdk(gw).models.retrieve("gpt-4o")

    run(test)


def test_logprobs_come_back_per_token_whole_and_streamed():
    async def test(stub, backend, gw, channel):
        def token(text, logprob):
            return {"token": text, "bytes": list(text.encode()), "logprob": logprob,
                    "top_logprobs": [{"token": text, "bytes": list(text.encode()), "logprob": logprob},
                                     {"token": "x", "bytes": [120], "logprob": -3.0}]}

        backend.script = [ResponseChunk("Hel", [1], False, logprobs=[token("Hel", -0.25)]),
                          ResponseChunk("lo", [2], True, "stop", 3, 2, 0, -0.5, "1", [], logprobs=[token("lo", -0.5)])]
        answer = await sdk(gw).chat.completions.create(model="pixtral", messages=[{"role": "user", "content": "hi"}],
                                                       logprobs=True, top_logprobs=2)
        content = answer.choices[0].logprobs.content
        assert [(t.token, t.logprob, t.bytes) for t in content] == [("Hel", -0.25, [72, 101, 108]), ("lo", -0.5, [108, 111])]
        assert [top.token for top in content[0].top_logprobs] == ["Hel", "x"]
        params = backend.calls[-1][3]
        assert params.logprobs and params.top_logprobs == 2
        chunks = [c async for c in await sdk(gw).chat.completions.create(
            model="pixtral", messages=[{"role": "user", "content": "hi"}], logprobs=True, stream=True)]
        assert [t.token for c in chunks for t in c.choices[0].logprobs.content] == ["Hel", "lo"]

    run(test)


def test_a_streamed_tool_call_arrives_as_tool_calls_only_never_as_content():
    async def test(stub, backend, gw, channel):
        tool = {"type": "function", "function": {"name": "zoom", "parameters": {"type": "object", "properties": {}}}}
        pieces = ["Let me look. ", "[TOOL", "_CALLS][{\"name\":\"zoom\",", "\"arguments\":{}}]"]
        backend.script = [ResponseChunk(p, [i], False) for i, p in enumerate(pieces)] + [
            ResponseChunk("", [9], True, "stop", 3, 4, 0, -0.5, "1", [])]
        chunks = [c async for c in await sdk(gw).chat.completions.create(
            model="pixtral", messages=[{"role": "user", "content": "zoom in"}], tools=[tool], stream=True)]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert content == "Let me look. "
        [call] = [call for c in chunks for call in c.choices[0].delta.tool_calls or ()]
        assert (call.index, call.function.name, call.function.arguments) == (0, "zoom", "{}") and call.id.startswith("call_")
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # Text that only looked like the start of a marker is sent once the answer shows it is not one.
        backend.script = [ResponseChunk("a [TOOL", [1], False), ResponseChunk(" box", [2], True, "stop", 3, 2, 0, -1, "1", [])]
        chunks = [c async for c in await sdk(gw).chat.completions.create(
            model="pixtral", messages=[{"role": "user", "content": "zoom in"}], tools=[tool], stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "a [TOOL box"

    run(test)


def test_the_official_sdks_tool_loop_goes_back_as_a_tool_loop():
    async def test(stub, backend, gw, channel):
        client = sdk(gw)
        tool = {"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
        backend.script = [ResponseChunk('[TOOL_CALLS][{"name":"weather","arguments":{"city":"Oslo"}}]', [1], True,
                                        "stop", 3, 2, 0, -0.5, "1", [])]
        first = await client.chat.completions.create(model="pixtral", messages=messages, tools=[tool])
        call = first.choices[0].message.tool_calls[0]
        messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
        backend.script = [ResponseChunk("It is 18C.", [1], True, "stop", 3, 2, 0, -0.5, "1", [])]
        second = await client.chat.completions.create(model="pixtral", messages=messages, tools=[tool])
        assert second.choices[0].message.content == "It is 18C."
        sent = backend.calls[-1][1]
        assert sent[2] == {"role": "assistant", "content": [], "tool_calls": [
            {"id": call.id, "name": "weather", "arguments": '{"city":"Oslo"}'}]}
        assert sent[3] == {"role": "tool", "content": [{"type": "text", "text": "18C"}], "tool_call_id": call.id}

    run(test)


def test_a_client_gone_before_the_first_token_ends_its_generation():
    async def test(stub, backend, gw, channel):
        started, ended = asyncio.Event(), asyncio.Event()

        async def slow(*args, **kwargs):
            started.set()
            try:
                await asyncio.sleep(60)  # a long prefill: no token yet
                yield ResponseChunk("late", [1], True, "stop")
            finally:
                ended.set()

        backend.generate = slow
        body = {"model": "pixtral", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as client:
            request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body,
                                                        headers={"Authorization": "Bearer secret"}))
            await asyncio.wait_for(started.wait(), 10)
            request.cancel()  # the client closes its connection
        await asyncio.wait_for(ended.wait(), 5)

    run(test)


def test_what_a_body_holds_besides_its_images_is_found_without_parsing():
    from gateway.http_api import bytes_beside_images

    image = base64.b64encode(b"\x00" * 300_000).decode()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "text", "text": "two pictures"}]}]}).encode()
    assert bytes_beside_images(body, max_images=16) == len(body) - 2 * len(image) < 300
    # Past the image limit, what looks like more images counts as the rest of the body.
    assert bytes_beside_images(body, max_images=1) == len(body) - len(image)
    assert bytes_beside_images(b';base64,' * 1000, max_images=16) == 8000
