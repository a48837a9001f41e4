"""Hypothesis against the real gateway and the real Triton over gRPC: generated GenerateRequests (every
field of vlm.v1.GenerateRequest, nested messages, parts and tools; text, image and video parts with real
files mutated: truncated, bit-flipped, wrong magic, huge declared sizes; allowlisted and refused URLs)
are answered or refused with a status the caller can act on, never INTERNAL or UNKNOWN; after every
batch of examples both processes are alive and a good request is answered.

Derandomized (the examples follow from this file; no example database) so a CI run is reproducible.
Generation is kept to 1-4 tokens and every call has a deadline: the fuzzing is about the API.
"""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from tests.integration.conftest import KEY, PNG
from tests.unit.test_decoder_fuzz import VIDEO_SEEDS, mutated

pytestmark = pytest.mark.integration
METADATA = (("authorization", f"Bearer {KEY}"),)
EXAMPLES = 300
# Statuses that tell the caller what to change or when to retry; INTERNAL and UNKNOWN never.
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNIMPLEMENTED}
MODELS = ["qwen2.5-vl", "pixtral", "auto"]
CLIP = VIDEO_SEEDS[0]  # 2 s of 32x24 H.264

text = st.text(max_size=40)
small_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.floats(0, 2, width=32))


def enum_values(enum) -> st.SearchStrategy[int]:
    """The enum's values and a few it does not define (a newer client's)."""
    return st.one_of(st.sampled_from([value.number for value in enum.values]), st.integers(-3, 40))


@st.composite
def media_source(draw, message_type, kind: str, image_host: str):
    if draw(st.booleans()):
        return message_type(data=draw(st.one_of(st.just(PNG) if kind == "image" else st.nothing(), mutated(kind))))
    url = draw(st.sampled_from([f"http://{image_host}/cat.png", "http://example.com/a.png", "ftp://x/y",
                                "http://user:pw@" + image_host + "/a.png", "not a url", "http://[::1"]))
    return message_type(url=url)


def parts(image_host: str):
    image = media_source(vlm_pb2.Image, "image", image_host)
    video = st.builds(lambda source, fps, frames: source.__class__(
        **{source.WhichOneof("source"): getattr(source, source.WhichOneof("source"))}, fps=fps, max_frames=frames),
        media_source(vlm_pb2.Video, "video", image_host), small_float, st.integers(-2, 300))
    return st.one_of(
        st.builds(vlm_pb2.Part, text=text),
        st.builds(vlm_pb2.Part, image=image),
        st.builds(vlm_pb2.Part, video=video),
        st.just(vlm_pb2.Part()),  # no kind set at all
    )


def messages(image_host: str):
    tool_call = st.builds(vlm_pb2.ToolCall, name=text, arguments=st.sampled_from(['{"x": 1}', "{", "", "[]"]), id=text)
    return st.builds(vlm_pb2.Message, role=st.sampled_from(["user", "assistant", "system", "tool", "", "robot"]),
                     parts=st.lists(parts(image_host), max_size=3), tool_calls=st.lists(tool_call, max_size=1),
                     tool_call_id=text)


config = st.builds(
    vlm_pb2.GenerationConfig,
    max_tokens=st.one_of(st.integers(1, 4), st.integers(1, 4), st.sampled_from([-1, 0, 10**6])),
    temperature=small_float, top_p=small_float, top_k=st.integers(-5, 100), seed=st.integers(-2**63, 2**63 - 1),
    stop=st.lists(text, max_size=3), repetition_penalty=small_float,
    response_format=st.builds(vlm_pb2.ResponseFormat, type=enum_values(vlm_pb2.ResponseFormat.Type.DESCRIPTOR),
                              json_schema=st.sampled_from(["", '{"type": "object"}', "{", '{"type": "integer"}']),
                              regex=st.sampled_from(["", "[a-z]+", "(", "a{99999}"]), choices=st.lists(text, max_size=3)),
    presence_penalty=small_float, frequency_penalty=small_float, logprobs=st.booleans(), top_logprobs=st.integers(-1, 30),
)
tools = st.lists(st.builds(vlm_pb2.Tool, name=st.sampled_from(["zoom", "", "bad name!", "x" * 100]), description=text,
                           parameters=st.sampled_from(['{"type": "object", "properties": {}}', "{", "", "[]"])),
                 max_size=2)


def generate_requests(image_host: str):
    fields = {
        "model": st.one_of(st.sampled_from(MODELS), text),
        "messages": st.lists(messages(image_host), max_size=3),
        "config": config,
        "request_id": st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9_.:/-]{1,20}", fullmatch=True), text),
        "detail": enum_values(vlm_pb2.ImageDetail.DESCRIPTOR),
        "routing": st.builds(vlm_pb2.RoutingOptions, confidence_threshold=small_float, disable_fallback=st.booleans()),
        "task": enum_values(vlm_pb2.Task.DESCRIPTOR),
        "tools": tools,
        "tool_choice": st.builds(vlm_pb2.ToolChoice, mode=enum_values(vlm_pb2.ToolChoice.Mode.DESCRIPTOR),
                                 name=st.sampled_from(["", "zoom", "missing"])),
    }
    assert set(fields) == set(vlm_pb2.GenerateRequest.DESCRIPTOR.fields_by_name), "a field the fuzzing leaves out"
    # Two in three examples are near valid: random ones rarely get past validation.
    return st.one_of(st.fixed_dictionaries(fields).map(lambda values: vlm_pb2.GenerateRequest(**values)),
                     near_valid(image_host, fields), near_valid(image_host, fields))


@st.composite
def near_valid(draw, image_host: str, fields: dict):
    """A mostly valid request (a served model, one user message with text and up to two images or clips,
    their files often mutated, 1-4 tokens) with at most one other field drawn at random: these reach the
    gateway's header checks, Triton's decoders and the engine."""
    image = st.builds(vlm_pb2.Part, image=st.one_of(st.just(vlm_pb2.Image(data=PNG)),
                                                    media_source(vlm_pb2.Image, "image", image_host)))
    clip = st.one_of(st.just(CLIP), mutated("video"))
    video = st.builds(vlm_pb2.Part, video=st.builds(vlm_pb2.Video, data=clip, max_frames=st.integers(2, 4)))
    request = vlm_pb2.GenerateRequest(model=draw(st.sampled_from(MODELS)), messages=[vlm_pb2.Message(
        role="user", parts=[vlm_pb2.Part(text="Describe"), *draw(st.lists(st.one_of(image, video), max_size=2))])])
    request.config.max_tokens = draw(st.integers(1, 4))
    name = draw(st.one_of(st.none(), st.sampled_from(["config", "request_id", "detail", "routing", "task", "tools",
                                                      "tool_choice"])))
    if name == "config":
        request.config.CopyFrom(draw(fields["config"]))
    elif name in ("request_id", "detail", "task"):
        setattr(request, name, draw(fields[name]))
    elif name == "tools":
        request.tools.extend(draw(fields[name]))
    elif name is not None:
        getattr(request, name).CopyFrom(draw(fields[name]))
    return request


def good_request() -> vlm_pb2.GenerateRequest:
    return vlm_pb2.GenerateRequest(model="pixtral", config=vlm_pb2.GenerationConfig(max_tokens=2), messages=[
        vlm_pb2.Message(role="user", parts=[vlm_pb2.Part(text="Describe"), vlm_pb2.Part(image=vlm_pb2.Image(data=PNG))])])


def test_generated_requests_never_make_an_internal_error_or_a_crash(triton, gateway, image_host):
    with grpc.insecure_channel(gateway.address) as channel:
        stub = vlm_pb2_grpc.VisionLanguageServiceStub(channel)
        calls, outcomes = 0, Counter()

        def still_serving():
            assert gateway.process.poll() is None and triton.process.poll() is None, "a process died"
            answer = stub.Generate(good_request(), metadata=METADATA, timeout=60)
            assert answer.usage.completion_tokens >= 1

        @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(generate_requests(image_host), st.booleans())
        def check(request, stream):
            nonlocal calls
            try:
                if stream:
                    for _ in stub.GenerateStream(request, metadata=METADATA, timeout=30):
                        pass
                else:
                    stub.Generate(request, metadata=METADATA, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                assert code in EXPECTED, f"{code.name}: {error.details()}"
                assert error.details(), "a refusal that says nothing"
            event(code.name)
            outcomes[code.name] += 1
            calls += 1
            if calls % 25 == 0:
                still_serving()

        check()
        still_serving()
        print(f"gRPC fuzz: {calls} generated requests: {dict(outcomes)}")
        assert outcomes["OK"] >= calls // 5, outcomes  # the fuzzing reached the model, not only validation
