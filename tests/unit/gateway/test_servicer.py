"""The gateway's gRPC surface in-process, over a scripted stand-in for the Triton backend.

(grpcio-testing drives only synchronous servicers; this one is grpc.aio, so the tests run a real
aio server on a loopback port. The real Triton path is covered end to end in tests/integration.)
"""

import asyncio
import ipaddress
import json
import re
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway import server as gateway_server
from gateway.errors import field_violations
from gateway.settings import Settings
from vlm_serving import tasks
from vlm_serving.pipelines import pipeline
from tests.conftest import encode, http_host, picture, serving_file
from vlm_serving.ensemble_client import ResponseChunk
from vlm_serving.generation.sampling import SamplingDefaults

KEY = (("authorization", "Bearer secret"),)


class ScriptedBackend:
    """Answers every call with the chunks (or the error) the test put in `script`."""

    def __init__(self, url, **options):
        images = [{"kind": "diagram", "width": 448, "height": 336}]
        self.script = [ResponseChunk("Hel", [1], False),
                       ResponseChunk("lo", [2], True, "length", 12, 2, 4, -0.5, "3", images)]
        self.calls = []
        self.videos = []
        self.details = []
        self.routings = []
        self.tasks = []
        self.tools = []
        self.ready = True
        self.unloaded: set[str] = set()  # Triton models left out of the repository index

    async def generate(self, ensemble, messages, images, params, request_id, detail=None, routing=None, task=None,
                       tools="", videos=()):
        self.calls.append((ensemble, messages, images, params))
        self.videos.append(videos)
        self.tools.append(tools)
        self.details.append(detail)
        self.routings.append(routing)
        self.tasks.append(task)
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            yield item

    async def server_live(self):
        return self.ready

    async def repository_index(self):
        if not self.ready:
            return []
        return [{"name": name, "version": "1", "state": "READY"} for name in pipeline("auto")
                if name not in self.unloaded]

    async def model_parameters(self, name):
        context = {"pixtral_generate": "8192", "qwen2_5_vl_generate": "4096"}[name]
        return {"quantization": "int8", "sampling_defaults": SamplingDefaults(0.7, 0.8, 20, 1.05).to_json(),
                "context_tokens": context, "max_tokens_limit": "4096"}

    async def close(self):
        pass


def run(test, channel_options=(), **settings_changes):
    """Start a gateway on a free port with the scripted backend (as its one inference server) and run
    `test(stub, backend, gw, channel)`."""

    async def main():
        settings = Settings(listen_address="127.0.0.1:0", api_keys=frozenset({"secret"}), metrics_port=0,
                            health_poll_s=0.05, **{"http_address": "127.0.0.1:0", **settings_changes})
        original = gateway_server.TritonBackend
        gateway_server.TritonBackend = ScriptedBackend
        try:
            gw = await gateway_server.start(settings)
        finally:
            gateway_server.TritonBackend = original
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}", options=list(channel_options)) as channel:
                [server] = gw.backend.servers.values()  # the pool of one server, its backend scripted
                await test(vlm_pb2_grpc.VisionLanguageServiceStub(channel), server.backend, gw, channel)
        finally:
            await gw.stop(0)

    asyncio.run(main())


def request(model="pixtral", text="hi"):
    return vlm_pb2.GenerateRequest(model=model, messages=[vlm_pb2.Message(role="user", parts=[vlm_pb2.Part(text=text)])],
                                   request_id="req-1")


def test_generate_joins_the_chunks_and_reports_usage():
    async def test(stub, backend, gw, channel):
        call = stub.Generate(request(), metadata=KEY)
        answer = await call
        assert (answer.text, answer.finish_reason, answer.model, answer.request_id) == (
            "Hello", vlm_pb2.FINISH_REASON_LENGTH, "pixtral", "req-1")
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.image_tokens) == (12, 2, 4)
        assert answer.confidence == pytest.approx(-0.5)
        assert ("x-request-id", "req-1") in tuple(await call.trailing_metadata())
        ensemble, messages, images, params = backend.calls[0]
        assert ensemble == "pixtral" and not params.stream and images == []
        assert messages == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        assert answer.route == vlm_pb2.Route(
            attempts=[vlm_pb2.RouteAttempt(model="pixtral", model_version="3", confidence=-0.5, completion_tokens=2)],
            reason=vlm_pb2.ROUTE_REASON_REQUESTED,
            images=[vlm_pb2.ProcessedImage(kind=vlm_pb2.IMAGE_KIND_DIAGRAM, width=448, height=336)])

    run(test)


def test_logprobs_come_back_over_grpc_whole_and_streamed():
    def entry(text, logprob):
        return {"token": text, "bytes": list(text.encode()), "logprob": logprob,
                "top_logprobs": [{"token": text, "bytes": list(text.encode()), "logprob": logprob}]}

    async def test(stub, backend, gw, channel):
        backend.script = [ResponseChunk("Hel", [1], False, logprobs=[entry("Hel", -0.25)]),
                          ResponseChunk("lo", [2], True, "stop", 3, 2, 0, -0.5, "1", [], logprobs=[entry("lo", -0.5)])]
        asked = request()
        asked.config.logprobs, asked.config.top_logprobs = True, 1
        answer = await stub.Generate(asked, metadata=KEY)
        assert [(t.token, t.bytes, t.logprob, [top.token for top in t.top_logprobs]) for t in answer.logprobs] == [
            ("Hel", b"Hel", -0.25, ["Hel"]), ("lo", b"lo", -0.5, ["lo"])]
        assert backend.calls[-1][3].logprobs and backend.calls[-1][3].top_logprobs == 1
        streamed = [message async for message in stub.GenerateStream(asked, metadata=KEY)]
        assert [[t.token for t in message.logprobs] for message in streamed] == [["Hel"], ["lo"]]

    run(test)


def test_a_drain_ends_what_is_left_at_its_grace_with_unavailable_never_cancelled():
    """gRPC answers CANCELLED to calls that race a server's shutdown before they ran (clients may
    retry those); a call the gateway ran must never end with it."""
    async def test(stub, backend, gw, channel):
        closed = asyncio.Event()

        async def endless(*args, **kwargs):
            try:
                yield ResponseChunk("Hel", [1], False)
                await asyncio.sleep(60)
            finally:
                closed.set()  # where TritonBackend cancels the request in Triton

        backend.generate = endless
        call = stub.GenerateStream(request(), metadata=KEY)
        assert (await call.read()).text == "Hel"
        draining = asyncio.ensure_future(gw.drain(0.3))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "drain" in ended.value.details()
        await asyncio.wait_for(closed.wait(), 5)
        await draining
        sample = gw.metrics.registry.get_sample_value
        assert sample("vlm_requests_total", {"model": "pixtral", "method": "GenerateStream", "code": "UNAVAILABLE"}) == 1

    run(test)


def task_request(task, *parts, model="qwen2.5-vl", **config):
    return vlm_pb2.GenerateRequest(model=model, task=task, config=vlm_pb2.GenerationConfig(**config), messages=[
        vlm_pb2.Message(role="user", parts=list(parts))])


def test_a_task_sets_its_format_and_answers_with_boxes_in_the_sent_images_pixels():
    png = encode(picture(640, 480))

    async def test(stub, backend, gw, channel):
        images = [{"kind": "photo", "width": 320, "height": 240}]
        backend.script = [ResponseChunk('```json\n[{"bbox_2d": [10, 20, 110', [1], False),
                          ResponseChunk(', 220], "label": "cat"}]\n```', [2], True, "stop", 12, 2, 4, -0.5, "1", images)]
        answer = await stub.Generate(task_request(vlm_pb2.TASK_GROUNDING, vlm_pb2.Part(image=vlm_pb2.Image(data=png)),
                                                  vlm_pb2.Part(text="cats")), metadata=KEY)
        assert answer.WhichOneof("result") == "detections" and not answer.result_error
        assert answer.detections == vlm_pb2.Detections(detections=[vlm_pb2.Detection(
            label="cat", box=vlm_pb2.Box(x_min=20, y_min=40, x_max=220, y_max=440), image_index=0)])
        _, _, _, params = backend.calls[0]
        assert backend.tasks == ["grounding"] and params.response_format.type == "json_schema"
        last = [m async for m in stub.GenerateStream(task_request(
            vlm_pb2.TASK_GROUNDING, vlm_pb2.Part(image=vlm_pb2.Image(data=png))), metadata=KEY)][-1]
        assert last.detections == answer.detections

        backend.script = [ResponseChunk('[{"bbox_2d": [10, 2', [1], True, "length", 12, 2, 4, -0.5, "1", images)]
        cut = await stub.Generate(task_request(vlm_pb2.TASK_GROUNDING, vlm_pb2.Part(image=vlm_pb2.Image(data=png))),
                                  metadata=KEY)
        assert cut.WhichOneof("result") is None and "max_tokens cut the answer" in cut.result_error

    run(test)


# Whole answers of every task in each family's units for TASK_PNG (Qwen2.5-VL: pixels of the 320x240
# it saw; Pixtral: per mille), each with its result.
TASK_PNG = encode(picture(640, 480))
TASK_IMAGES = [{"kind": "photo", "width": 320, "height": 240}]
WHOLE_ANSWERS = {
    "caption": ("A cat on a sofa.", "caption"),
    "vqa": ("Two cats.", None),
    "ocr": ('[{"bbox_2d": [0, 0, 160, 12], "text_content": "INVOICE 42"}, '
            '{"bbox_2d": [0, 20, 90, 32], "text_content": "tea 3.50"}]', "text_lines"),
    "document": ("# Invoice 42\n\n| item | price |\n|---|---|\n| tea | 3.50 |", "document"),
    "grounding": ('[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}, {"bbox_2d": [0, 0, 300, 200], "label": "sofa"}]',
                  "detections"),
    "chart": ('{"header": ["year", "sales"], "rows": [["2023", "5"]]}', "table"),
}


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral"])
@pytest.mark.parametrize("task", sorted(WHOLE_ANSWERS))
def test_a_task_answer_max_tokens_cut_has_no_result_and_its_error_names_the_cut(task, model):
    """Whole text cut by max_tokens (the JSON happens to close, the caption reads as a sentence) is
    still cut: no result, unary and streamed, and result_error says why."""
    text, result = WHOLE_ANSWERS[task]

    async def test(stub, backend, gw, channel):
        ask = task_request(vlm_pb2.Task.Value(f"TASK_{task.upper()}"), vlm_pb2.Part(image=vlm_pb2.Image(data=TASK_PNG)),
                           vlm_pb2.Part(text="what is it?"), model=model)
        backend.script = [ResponseChunk(text, [1], True, "stop", 12, 2, 4, -0.5, "1", TASK_IMAGES)]
        whole = await stub.Generate(ask, metadata=KEY)
        assert whole.WhichOneof("result") == result and not whole.result_error, whole.result_error
        backend.script = [ResponseChunk(text[:-1], [1], False),
                          ResponseChunk(text[-1:], [2], True, "length", 12, 2, 4, -0.5, "1", TASK_IMAGES)]
        for answer in (await stub.Generate(ask, metadata=KEY),
                       [m async for m in stub.GenerateStream(ask, metadata=KEY)][-1]):
            assert answer.finish_reason == vlm_pb2.FINISH_REASON_LENGTH and answer.WhichOneof("result") is None
            assert answer.result_error.startswith(f"max_tokens cut the answer before its {task} result was complete")

    run(test)


@pytest.mark.parametrize("settings, expected", [
    ({}, {**tasks.DEFAULT_MAX_TOKENS, None: None}),  # no deployment default: until the answer or the context ends
    ({"default_max_tokens": 512}, {"caption": 256, "vqa": 256, "ocr": 512, "document": 512, "grounding": 512,
                                   "chart": 512, None: 512}),  # the deployment's caps the tasks'
    ({"max_tokens_limit": 1500}, {"caption": 256, "vqa": 256, "ocr": 1500, "document": 1500, "grounding": 1024,
                                  "chart": 1024, None: None}),
])
def test_each_task_has_its_own_default_max_tokens_within_the_deployments(settings, expected):
    """An unset max_tokens: the task's own, unless the deployment's default or limit is lower; the
    caller's value always wins."""
    async def test(stub, backend, gw, channel):
        image = vlm_pb2.Part(image=vlm_pb2.Image(data=TASK_PNG))
        backend.script = [ResponseChunk("A cat.", [1], True, "stop", 12, 2, 4, -0.5, "1", TASK_IMAGES)]
        for task in WHOLE_ANSWERS:
            await stub.Generate(task_request(vlm_pb2.Task.Value(f"TASK_{task.upper()}"), image,
                                             vlm_pb2.Part(text="what?")), metadata=KEY)
            assert backend.calls[-1][3].max_tokens == expected[task], task
        await stub.Generate(request(), metadata=KEY)
        assert backend.calls[-1][3].max_tokens == expected[None]  # no task
        await stub.Generate(task_request(vlm_pb2.TASK_OCR, image, max_tokens=9), metadata=KEY)
        assert backend.calls[-1][3].max_tokens == 9

    run(test, **settings)


def test_boxes_outside_the_image_are_dropped_and_counted_in_the_answer():
    async def test(stub, backend, gw, channel):
        backend.script = [ResponseChunk('[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}, '
                                        '{"bbox_2d": [330, 250, 400, 300], "label": "ghost"}]',
                                        [1], True, "stop", 12, 2, 4, -0.5, "1", TASK_IMAGES)]
        answer = await stub.Generate(task_request(vlm_pb2.TASK_GROUNDING, vlm_pb2.Part(image=vlm_pb2.Image(
            data=TASK_PNG))), metadata=KEY)
        assert [d.label for d in answer.detections.detections] == ["cat"] and answer.detections.boxes_outside == 1

    run(test)


@pytest.mark.parametrize("parts, config, field, message", [
    ([vlm_pb2.Part(text="no image")], {}, "messages", "task ocr needs at least one image"),
    ([vlm_pb2.Part(image=vlm_pb2.Image(data=b"x"))],
     {"response_format": vlm_pb2.ResponseFormat(type=vlm_pb2.ResponseFormat.RESPONSE_FORMAT_JSON_OBJECT)},
     "config.response_format", "shapes its own answer"),
])
def test_a_task_refuses_what_it_cannot_serve(parts, config, field, message):
    async def test(stub, backend, gw, channel):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(task_request(vlm_pb2.TASK_OCR, *parts, **config), metadata=KEY)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in dict(field_violations(refused.value))[field]

    run(test)


WEATHER = vlm_pb2.Tool(name="get_weather", description="weather", parameters=json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))


def tool_request(mode, name="", model="qwen2.5-vl"):
    message = request(model=model, text="weather in Oslo?")
    message.tools.append(WEATHER)
    message.tool_choice.CopyFrom(vlm_pb2.ToolChoice(mode=mode, name=name))
    return message


def test_tool_calls_are_constrained_parsed_and_returned_typed_and_none_never_calls():
    async def test(stub, backend, gw, channel):
        call_text = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>'
        backend.script = [ResponseChunk(call_text, [1], True, "stop", 12, 2, 0, -0.5, "1", [])]
        answer = await stub.Generate(tool_request(vlm_pb2.ToolChoice.TOOL_CHOICE_REQUIRED), metadata=KEY)
        [call] = answer.tool_calls
        assert (call.name, call.arguments) == ("get_weather", '{"city":"Oslo"}')
        assert re.fullmatch(r"call_[0-9a-f]{24}", call.id), call.id  # to send back with the tool's result
        _, _, _, params = backend.calls[-1]
        assert params.response_format.type == "tool_call" and json.loads(backend.tools[-1])[0]["function"]["name"] == "get_weather"
        answer = await stub.Generate(tool_request(vlm_pb2.ToolChoice.TOOL_CHOICE_AUTO), metadata=KEY)
        assert len(answer.tool_calls) == 1
        assert not backend.calls[-1][3].response_format.constrained, "auto leaves the model free to answer in text"
        answer = await stub.Generate(tool_request(vlm_pb2.ToolChoice.TOOL_CHOICE_NONE), metadata=KEY)
        assert not answer.tool_calls and backend.tools[-1] == "", "none: the model never sees the tools"
        backend.script = [ResponseChunk('<tool_call>\n{"name":"get_weather","argu', [1], True, "length", 12, 2, 0, -0.5,
                                        "1", [])]
        answer = await stub.Generate(tool_request(vlm_pb2.ToolChoice.TOOL_CHOICE_NAMED, "get_weather"), metadata=KEY)
        assert not answer.tool_calls and "max_tokens cut the call" in answer.result_error

    run(test)


@pytest.mark.parametrize("mutate, field, message", [
    (lambda m: m.tool_choice.CopyFrom(vlm_pb2.ToolChoice(mode=vlm_pb2.ToolChoice.TOOL_CHOICE_NAMED, name="nope")),
     "tool_choice.name", "'nope' is not one of the tools"),
    (lambda m: m.tools.append(WEATHER), "tools[1].name", "given twice"),
    (lambda m: m.tools.append(vlm_pb2.Tool(name="bad name")), "tools[1].name", "letters, digits"),
    (lambda m: m.tools.append(vlm_pb2.Tool(name="x", parameters='{"type": "string"}')), "tools[1].parameters",
     "the arguments are a JSON object"),
    (lambda m: m.config.response_format.CopyFrom(vlm_pb2.ResponseFormat(
        type=vlm_pb2.ResponseFormat.RESPONSE_FORMAT_JSON_OBJECT)), "tool_choice", "leave config.response_format"),
])
def test_bad_tools_are_refused_naming_the_field(mutate, field, message):
    async def test(stub, backend, gw, channel):
        bad = tool_request(vlm_pb2.ToolChoice.TOOL_CHOICE_REQUIRED)
        mutate(bad)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(bad, metadata=KEY)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in dict(field_violations(refused.value))[field]

    run(test)


def test_auto_gets_its_routing_options_other_models_refuse_them_and_answers_name_the_routed_model():
    async def test(stub, backend, gw, channel):
        images = [{"kind": "diagram", "width": 448, "height": 336}]
        route = {"family": "pixtral", "reason": "low_confidence", "attempts": [
            {"family": "qwen2_5_vl", "model_version": "1", "confidence": -2.0, "completion_tokens": 2},
            {"family": "pixtral", "model_version": "3", "confidence": -0.1, "completion_tokens": 2}]}
        backend.script = [ResponseChunk("Hel", [1], False, route={"family": "pixtral"}),
                          ResponseChunk("lo", [2], True, "length", 12, 2, 4, -0.1, "3", images, route)]
        message = request(model="auto")
        message.routing.confidence_threshold = -0.5
        answer = await stub.Generate(message, metadata=KEY)
        assert backend.routings[-1] == {"confidence_threshold": -0.5, "fallback": True}
        assert answer.model == "pixtral" and answer.route.reason == vlm_pb2.ROUTE_REASON_LOW_CONFIDENCE
        assert [(a.model, a.model_version) for a in answer.route.attempts] == [("qwen2.5-vl", "1"), ("pixtral", "3")]
        streamed = [m async for m in stub.GenerateStream(request(model="auto"), metadata=KEY)]
        assert [m.model for m in streamed] == ["pixtral", "pixtral"] and backend.routings[-1]["confidence_threshold"] is None
        message = request(model="auto")
        message.routing.disable_fallback = True
        await stub.Generate(message, metadata=KEY)
        assert backend.routings[-1] == {"confidence_threshold": None, "fallback": False}
        for model, threshold, field in (("pixtral", -0.5, "routing"), ("auto", 0.5, "routing.confidence_threshold")):
            message = request(model=model)
            message.routing.confidence_threshold = threshold
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(message, metadata=KEY)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in caught.value.details()
        assert len(backend.routings) == 3, "refused requests never reach the backend"

    run(test)


@pytest.mark.parametrize("reason,expected,attempts,answering", [
    ("fallback_failed", vlm_pb2.ROUTE_REASON_FALLBACK_FAILED,
     [("qwen2_5_vl", "1", ""), ("pixtral", "", "Exceeds maximum queue size: 64 requests already wait")], "qwen2_5_vl"),
    ("specialist_failed", vlm_pb2.ROUTE_REASON_SPECIALIST_FAILED,
     [("pixtral", "", "Request for unknown model: 'pixtral' is not found"), ("qwen2_5_vl", "1", "")], "qwen2_5_vl"),
])
def test_a_route_whose_pixtral_call_failed_says_so_with_the_failed_attempts_error(reason, expected, attempts, answering):
    async def test(stub, backend, gw, channel):
        route = {"family": answering, "reason": reason, "attempts": [
            {"family": family, "model_version": version, "confidence": -2.0 if version else 0.0,
             "completion_tokens": 2 if version else 0, "error": error} for family, version, error in attempts]}
        backend.script = [ResponseChunk("Hel", [1], False, route={"family": answering}),
                          ResponseChunk("lo", [2], True, "length", 12, 2, 4, -2.0, "1", [], route)]
        answer = await stub.Generate(request(model="auto"), metadata=KEY)
        streamed = [m async for m in stub.GenerateStream(request(model="auto"), metadata=KEY)]
        for final in (answer, streamed[-1]):
            assert final.model == "qwen2.5-vl" and final.route.reason == expected
            assert [(a.model, a.model_version, a.error) for a in final.route.attempts] == [
                ({"qwen2_5_vl": "qwen2.5-vl", "pixtral": "pixtral"}[family], version, error)
                for family, version, error in attempts]

    run(test)


def test_detail_reaches_the_backend_and_an_unknown_value_is_refused():
    async def test(stub, backend, gw, channel):
        for detail, expected in ((vlm_pb2.IMAGE_DETAIL_UNSPECIFIED, None), (vlm_pb2.IMAGE_DETAIL_HIGH, "high"),
                                 (vlm_pb2.IMAGE_DETAIL_LOW, "low"), (vlm_pb2.IMAGE_DETAIL_AUTO, "auto")):
            message = request()
            message.detail = detail
            await stub.Generate(message, metadata=KEY)
            assert backend.details[-1] == expected
        message = request()
        message.detail = 7
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(message, metadata=KEY)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "detail" in caught.value.details()

    run(test)


def test_stream_sends_deltas_and_finishes_on_the_last():
    async def test(stub, backend, gw, channel):
        messages = [m async for m in stub.GenerateStream(request(), metadata=KEY)]
        assert [m.text for m in messages] == ["Hel", "lo"]
        assert [m.finish_reason for m in messages] == [vlm_pb2.FINISH_REASON_UNSPECIFIED, vlm_pb2.FINISH_REASON_LENGTH]
        assert messages[0].usage.completion_tokens == 0 and messages[1].usage.completion_tokens == 2
        assert backend.calls[0][3].stream

    run(test)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", "secret"),)])
def test_every_rpc_needs_a_valid_key(metadata):
    async def test(stub, backend, gw, channel):
        for call in (stub.Generate(request(), metadata=metadata),
                     stub.ListModels(vlm_pb2.ListModelsRequest(), metadata=metadata)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <key>" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.GenerateStream(request(), metadata=metadata):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert backend.calls == []

    run(test)


def test_health_needs_no_key_and_follows_triton():
    async def test(stub, backend, gw, channel):
        health = health_pb2_grpc.HealthStub(channel)
        await asyncio.sleep(0.2)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        backend.ready = False
        await asyncio.sleep(0.2)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="vlm.v1.VisionLanguageService"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

    run(test)


@pytest.mark.parametrize("required", [(), ("pixtral",)])
def test_one_models_outage_leaves_the_replica_serving_unless_that_model_is_required(required):
    async def test(stub, backend, gw, channel):
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service=""):
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

        backend.unloaded = {"pixtral_generate"}
        await asyncio.sleep(0.2)
        SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("vlm.v1.VisionLanguageService/pixtral") == NOT_SERVING
        assert await status("vlm.v1.VisionLanguageService/qwen2.5-vl") == SERVING
        expected = NOT_SERVING if required else SERVING
        assert await status() == await status("vlm.v1.VisionLanguageService") == expected
        assert gw.readiness() == (expected == SERVING)
        models = {m.name: m.ready for m in (await stub.ListModels(vlm_pb2.ListModelsRequest(), metadata=KEY)).models}
        assert models == {"pixtral": False, "auto": True, "qwen2.5-vl": True}

    run(test, required_models=required)


# Triton models left out of the index -> whether model auto serves: routing keeps Qwen2.5-VL's answer
# when Pixtral's call fails (FALLBACK_FAILED, SPECIALIST_FAILED), so auto needs itself and Qwen2.5-VL.
AUTO_SERVES_WITHOUT = [({"pixtral_generate"}, True), (set(pipeline("pixtral")), True),
                       ({"qwen2_5_vl_embed"}, False), ({"qwen2_5_vl"}, False), ({"auto"}, False)]


@pytest.mark.parametrize("unloaded,serves", AUTO_SERVES_WITHOUT)
def test_auto_serves_while_itself_and_qwen_are_ready_whatever_pixtrals_state(unloaded, serves):
    async def test(stub, backend, gw, channel):
        health = health_pb2_grpc.HealthStub(channel)
        backend.unloaded = unloaded
        await asyncio.sleep(0.2)
        status = (await health.Check(health_pb2.HealthCheckRequest(service="vlm.v1.VisionLanguageService/auto"))).status
        assert status == (health_pb2.HealthCheckResponse.SERVING if serves else health_pb2.HealthCheckResponse.NOT_SERVING)
        assert gw.readiness(), "Qwen2.5-VL or Pixtral still serves: so does the replica"
        models = {m.name: m for m in (await stub.ListModels(vlm_pb2.ListModelsRequest(), metadata=KEY)).models}
        assert models["auto"].ready == serves
        if serves:  # what a request to auto may ask: Qwen2.5-VL's limits, the one family that can answer
            assert (models["auto"].context_tokens, models["auto"].max_tokens) == (4096, 4096)
            assert (await stub.Generate(request(model="auto"), metadata=KEY)).text == "Hello"
            assert backend.calls[-1][0] == "auto"
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(request(model="auto"), metadata=KEY)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and backend.calls == []

    run(test)


def test_validation_errors_carry_field_violations_and_skip_triton():
    async def test(stub, backend, gw, channel):
        bad = request()
        bad.config.temperature = 7
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(bad, metadata=KEY)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(caught.value) == [("config.temperature", "temperature=7 must be in [0, 2] (0 = greedy)")]
        assert backend.calls == []

    run(test)


def test_triton_errors_become_status_codes_and_metrics_count_them():
    async def test(stub, backend, gw, channel):
        backend.script = [InferenceServerException("in ensemble 'pixtral', Exceeds maximum queue size")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request(), metadata=KEY)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        backend.script = [InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.GenerateStream(request(), metadata=KEY):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        sample = gw.metrics.registry.get_sample_value
        assert sample("vlm_requests_total", {"model": "pixtral", "method": "Generate", "code": "RESOURCE_EXHAUSTED"}) == 1
        assert sample("vlm_requests_total", {"model": "pixtral", "method": "GenerateStream", "code": "UNAVAILABLE"}) == 1
        assert sample("vlm_requests_in_flight", {"model": "pixtral"}) == 0

    run(test)


def test_list_models_reports_versions_readiness_and_quantization():
    async def test(stub, backend, gw, channel):
        models = {m.name: m for m in (await stub.ListModels(vlm_pb2.ListModelsRequest(), metadata=KEY)).models}
        assert set(models) == {"pixtral", "qwen2.5-vl", "auto"}
        auto = models["auto"]  # the router: its own versions, no generation step of its own
        assert (auto.family, auto.ready, auto.quantization, [v.version for v in auto.versions]) == ("auto", True, "", ["1"])
        # Either family may answer: the router accepts what both do.
        assert (models["pixtral"].context_tokens, models["pixtral"].max_tokens) == (8192, 4096)
        assert (auto.context_tokens, auto.max_tokens) == (4096, 4096)
        pixtral = models["pixtral"]
        assert (pixtral.family, pixtral.ready, pixtral.quantization) == ("pixtral", True, "int8")
        assert [(v.version, v.state) for v in pixtral.versions] == [("1", "READY")]
        defaults = pixtral.defaults
        assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == pytest.approx(
            (0.7, 0.8, 20, 1.05))

    run(test)


def test_a_stream_read_slowly_past_its_deadline_ends_with_deadline_exceeded():
    async def test(stub, backend, gw, channel):
        # Far more text than gRPC's flow-control window holds, so the gateway waits on the reader.
        backend.script = [ResponseChunk("x" * 50_000, [1], False)] * 400 + [ResponseChunk("end", [2], True, "stop")]
        call = stub.GenerateStream(request(), metadata=KEY)  # no client deadline: the gateway's 1 s applies
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                received += 1
                if received == 1:
                    await asyncio.sleep(2)  # a reader that stalls past the deadline, then reads on
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
        assert 1 <= received < 401
        sample = gw.metrics.registry.get_sample_value
        assert sample("vlm_requests_total", {"model": "pixtral", "method": "GenerateStream",
                                             "code": "DEADLINE_EXCEEDED"}) == 1

    # The receive window stays at its initial size (no BDP growth): the reader's pace, not the
    # machine's, decides how much the gateway can write ahead.
    run(test, channel_options=[("grpc.http2.bdp_probe", 0)], default_timeout_s=1.0)


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_an_unexpected_failure_is_internal_with_the_request_id_and_counted(rpc, caplog):
    async def test(stub, backend, gw, channel):
        backend.script = [RuntimeError("a bug with secret details")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if rpc == "Generate":
                await stub.Generate(request(), metadata=KEY)
            else:
                async for _ in stub.GenerateStream(request(), metadata=KEY):
                    pass
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "req-1" in caught.value.details() and "secret details" not in caught.value.details()
        sample = gw.metrics.registry.get_sample_value
        assert sample("vlm_requests_total", {"model": "pixtral", "method": rpc, "code": "INTERNAL"}) == 1
        assert sample("vlm_requests_total", {"model": "pixtral", "method": rpc, "code": "CANCELLED"}) is None

    with caplog.at_level("ERROR", logger="gateway"):
        run(test)
    [record] = [r for r in caplog.records if r.getMessage() == "unexpected failure"]
    assert record.exc_info and "a bug with secret details" in str(record.exc_info[1])


@pytest.mark.parametrize("request_id", ["abc\n", "caf\u00e9", "a" * 129, "a b", "\u0661\u0662"])
def test_request_ids_that_metadata_cannot_carry_are_refused_before_any_work(request_id):
    async def test(stub, backend, gw, channel):
        bad = request()
        bad.request_id = request_id
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(bad, metadata=KEY)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in field_violations(caught.value)] == ["request_id"]
        assert backend.calls == []

    run(test)


def test_a_non_ascii_key_is_unauthenticated():
    # gRPC Python refuses to send such metadata, other clients do not: the interceptor is called as
    # grpc.aio calls it, with the header as the server decoded it.
    from gateway.auth import AuthInterceptor
    from gateway.keys import KeyRing, env_entries

    async def main():
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"answer")
        details = SimpleNamespace(method="/vlm.v1.VisionLanguageService/Generate",
                                  invocation_metadata=(("authorization", "Bearer s\u00e9cret"),))

        async def continuation(_):
            return handler

        keys = KeyRing(env_entries(frozenset({"secret"}), frozenset()))
        refusal = await AuthInterceptor(keys).intercept_service(continuation, details)
        context = SimpleNamespace()

        async def abort(code, message):
            context.aborted = (code, message)

        context.abort = abort

        async def requests():  # the refusal never reads the request
            raise AssertionError("the request was read")
            yield

        assert refusal.request_deserializer is None and refusal.stream_unary is not None
        await refusal.stream_unary(requests(), context)
        return context.aborted

    code, message = asyncio.run(main())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in message


@pytest.mark.parametrize("mode", ["public", "authenticated", "off"])
def test_reflection_is_public_by_default_and_can_be_authenticated_or_off(mode):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def list_services(channel, metadata=()):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(metadata=metadata)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        return {s.name for reply in [m async for m in call] for s in reply.list_services_response.service}

    async def test(stub, backend, gw, channel):
        if mode == "public":
            assert "vlm.v1.VisionLanguageService" in await list_services(channel)
            return
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_services(channel)
        assert caught.value.code() == (grpc.StatusCode.UNAUTHENTICATED if mode == "authenticated"
                                       else grpc.StatusCode.UNIMPLEMENTED)
        if mode == "authenticated":
            assert "vlm.v1.VisionLanguageService" in await list_services(channel, KEY)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(test, reflection=mode)


def test_the_request_deadline_covers_fetching_its_image_urls():
    with http_host(serving_file(encode(picture(12, 12)), delay_s=3)) as host:
        async def test(stub, backend, gw, channel):
            slow = request()
            slow.messages[0].parts.append(vlm_pb2.Part(image=vlm_pb2.Image(url=f"http://{host}/cat.png")))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(slow, metadata=KEY, timeout=10)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "0.5s" in caught.value.details()
            assert backend.calls == []

        run(test, default_timeout_s=0.5, image_url_allowlist=(host,), image_url_timeout_s=10,
            image_url_allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))


def test_a_request_whose_deadline_has_passed_is_not_sent_to_triton():
    """A request read after its caller's deadline (it waited in the server, or its validation ran past
    the deadline) ends DEADLINE_EXCEEDED without reaching Triton, where its images would be decoded
    and encoded for no one (issue 24's chaos run)."""
    async def test(stub, backend, gw, channel):
        delivered = []

        async def deliver(chunk, call, outcome):
            delivered.append(chunk)

        passed = SimpleNamespace(time_remaining=lambda: -0.01, set_trailing_metadata=lambda pairs: None)
        error = await gw.servicer.handle(request(), passed, "Generate", False, deliver)
        assert error is not None and error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert "not sent" in error.message
        assert backend.calls == [] and delivered == []

    run(test)


def test_no_ready_server_is_unavailable_naming_the_public_model():
    async def test(stub, backend, gw, channel):
        backend.ready = False
        await asyncio.sleep(0.2)  # the health watcher's probe finds it not live
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request(model="qwen2.5-vl"), metadata=KEY)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details().startswith("model 'qwen2.5-vl' is not ready on any inference server (")
        assert backend.calls == []

    run(test)
