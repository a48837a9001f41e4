"""Video parts at the gateway (issue 27, item 1): gRPC `Part.video` and OpenAI `video_url` parts are
checked before anything reaches Triton (sampling bounds, count, source rules, and the container's
header read without decoding), each refusal INVALID_ARGUMENT naming the field; good clips go to
Triton as the `VIDEOS` input beside `{"type": "video", "fps", "max_frames"}` parts in MESSAGES.
Clips are encoded here with PyAV (as tests/unit/test_video.py makes them)."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import ipaddress
import json
import math
import threading
import time
from fractions import Fraction

import av
import grpc
import httpx2 as httpx
import numpy as np
import openai
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor
from vlm.v1 import vlm_pb2

from gateway import validation
from gateway.errors import ApiError, field_violations
from gateway.image_urls import fetch_all
from gateway.settings import Settings
from gateway.triton_backend import TritonBackend, to_api_error
from gateway.validation import VideoSource, validate
from tests.conftest import encode, http_host, picture, serving_file
from tests.unit.gateway import fake_triton
from tests.unit.gateway.fake_triton import PARAMS, start_fake_triton
from tests.unit.gateway.test_servicer import KEY, run
from tests.unit.test_video import audio_only, zero_length
from tests.unit.test_video import spies  # noqa: F401 (a fixture: the decoders PyAV opens)
from vlm_serving.preprocessing import video as video_module
from vlm_serving.preprocessing.video import VideoError, decode_video, probe_video

SETTINGS = Settings(api_keys=frozenset({"k"}), image_url_allowlist=("media.internal",))
PNG = encode(picture(20, 20))


def clip(frames: int = 10, rate=10, size: tuple[int, int] = (64, 48), codec: str = "libx264") -> bytes:
    """`frames` solid grey frames at `rate` fps (H.264 in MP4, or VP8 in WebM), fast to encode."""
    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4" if codec == "libx264" else "webm") as container:
        stream = container.add_stream(codec, rate=rate, options={"preset": "ultrafast"} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), index * 20 % 250, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# Each bad clip once per session: the 4K one takes a moment to encode.
BAD_CLIPS = {
    "too big": lambda: clip(frames=40, size=(320, 240)),  # refused at a lowered byte limit (`tight`)
    "wrong magic": lambda: b"\x00\x00\x00\x18ftpy" + b"\x00" * 100,
    "audio only": audio_only,
    "zero length": lambda: b"",
    "too long": lambda: clip(frames=61, rate=Fraction(1, 10), size=(32, 32)),  # 610 s
    "frame too big": lambda: clip(frames=1, size=(4096, 2304)),  # over 4K UHD's pixels
    "too many pixels": lambda: clip(frames=9, rate=1, size=(3840, 2160)),  # 9 samples x 8.3 M > 2^26
}
BAD_CLIP_ERRORS = {
    "too big": "bytes is over the limit of 20000 bytes; send a shorter or smaller clip",
    "wrong magic": "not a supported video file (first bytes",
    "audio only": "the MP4 file has audio only, no video stream; send a video",
    "zero length": "empty video data (0 bytes); send the encoded file's bytes",
    "too long": "610.0 s is over the limit of 600 s; trim the clip",
    "frame too big": "frames of 4096x2304 = 9437184 pixels are over the limit of 8294400 pixels (decompression-bomb",
    "too many pixels": "9 frames of 3840x2160 = 74649600 pixels is over the budget of 67108864 pixels per clip; "
                       "lower fps or max_frames, or downscale",
}


@functools.cache
def bad_clip(kind: str) -> bytes:
    return BAD_CLIPS[kind]()


@functools.cache
def good_clip() -> bytes:
    return clip()


def tight(settings: Settings, kind: str) -> Settings:
    """`settings` with the video byte limit the "too big" clip is over (the others are far under it)."""
    if kind != "too big":
        return settings
    assert len(bad_clip(kind)) > 20_000 > len(good_clip())
    return Settings(**{**settings.__dict__, "max_video_bytes": 20_000})


def video(fps: float = 0.0, max_frames: int = 0, **source) -> vlm_pb2.Part:
    return vlm_pb2.Part(video=vlm_pb2.Video(fps=fps, max_frames=max_frames, **source))


def text(value: str) -> vlm_pb2.Part:
    return vlm_pb2.Part(text=value)


def request(*parts, role="user", model="qwen2.5-vl", **fields) -> vlm_pb2.GenerateRequest:
    return vlm_pb2.GenerateRequest(model=model, messages=[vlm_pb2.Message(role=role, parts=list(parts))], **fields)


def violations(req, settings: Settings = SETTINGS) -> dict[str, str]:
    with pytest.raises(ApiError) as caught:
        validate(req, settings, stream=False)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return dict(caught.value.violations)


# --- gRPC: what is sent for a good request ---------------------------------------------------------


def test_video_parts_become_messages_with_their_sampling_and_sources_in_part_order():
    first, second = good_clip(), clip(frames=5, codec="libvpx")
    call = validate(request(text("Compare"), video(data=first), vlm_pb2.Part(image=vlm_pb2.Image(data=PNG)),
                            video(fps=0.3, max_frames=8, data=second), text("please")), SETTINGS, stream=False)

    assert call.messages == [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "video", "fps": 2.0, "max_frames": 32},  # unset: the defaults, filled in for Triton
        {"type": "image"},
        {"type": "video", "fps": 0.3, "max_frames": 8},  # float32 0.3 read as the 0.3 the caller wrote
        {"type": "text", "text": "please"},
    ]}]
    assert [(v.field, v.data, v.fps, v.max_frames) for v in call.videos] == [
        ("messages[0].parts[1].video.data", first, 2.0, 32), ("messages[0].parts[3].video.data", second, 0.3, 8)]
    assert [image.data for image in call.images] == [PNG]


def test_the_limits_are_at_their_bounds_inclusive():
    call = validate(request(*[video(fps=30, max_frames=m, data=good_clip()) for m in (2, 256)], video(url="https://media.internal/a.mp4")),
                    SETTINGS, stream=False)
    assert [(v.fps, v.max_frames) for v in call.videos] == [(30.0, 2), (30.0, 256), (2.0, 32)]
    assert call.videos[2].url == "https://media.internal/a.mp4" and call.videos[2].data is None


def test_caption_and_vqa_take_a_video_alone_and_other_tasks_refuse_it():
    assert validate(request(video(data=good_clip()), task=vlm_pb2.TASK_CAPTION), SETTINGS, False).task == "caption"
    assert validate(request(video(data=good_clip()), text("Who?"), task=vlm_pb2.TASK_VQA), SETTINGS, False).task == "vqa"
    found = violations(request(video(data=good_clip()), vlm_pb2.Part(image=vlm_pb2.Image(data=PNG)),
                               task=vlm_pb2.TASK_OCR))
    assert "task ocr reads images only" in found["task"] and "caption or vqa" in found["task"], found


# --- gRPC: every bad video kind names its field -----------------------------------------------------


@pytest.mark.parametrize("part,field,message", [
    (video(fps=-1), "messages[0].parts[0].video.fps", "-1 is out of range; frames to sample per second, greater than "
                                                      "0 and at most 30 (unset: 2)"),
    (video(fps=30.5), "messages[0].parts[0].video.fps", "30.5 is out of range"),
    (video(fps=math.nan), "messages[0].parts[0].video.fps", "nan is out of range"),
    (video(fps=math.inf), "messages[0].parts[0].video.fps", "inf is out of range"),
    (video(max_frames=1), "messages[0].parts[0].video.max_frames", "1 is out of range; the most frames to sample, "
                                                                   "2 to 256 (unset: 32)"),
    (video(max_frames=257), "messages[0].parts[0].video.max_frames", "257 is out of range"),
    (video(max_frames=-4), "messages[0].parts[0].video.max_frames", "-4 is out of range"),
])
def test_bad_sampling_names_the_field_and_the_bounds(part, field, message):
    part.video.data = good_clip()
    found = violations(request(part))
    assert message in found.get(field, ""), found


@pytest.mark.parametrize("kind", list(BAD_CLIPS))
def test_each_bad_clip_is_refused_from_its_header_naming_the_data_field(kind, spies):
    found = violations(request(text("What happens?"), video(data=bad_clip(kind))), tight(SETTINGS, kind))
    assert list(found) == ["messages[0].parts[1].video.data"], found
    assert BAD_CLIP_ERRORS[kind] in found["messages[0].parts[1].video.data"], found
    assert all(spy.decoded == 0 for spy in spies), "refused from the header, before any frame is decoded"


def test_the_pixel_budget_counts_the_frames_the_request_samples():
    data = bad_clip("too many pixels")  # 9 s of 4K at 1 fps
    call = validate(request(video(max_frames=8, data=data)), SETTINGS, stream=False)  # 8 x 8.3 M fit
    assert call.videos[0].max_frames == 8


@pytest.mark.parametrize("url,message", [
    ("https://elsewhere.example/a.mp4", "host 'elsewhere.example' is not on this service's image URL allowlist "
                                        "(media.internal); send the video bytes in video.data instead"),
    ("ftp://media.internal/a.mp4", "only http(s) video URLs are fetched"),
    ("https://user:pw@media.internal/a.mp4", "video URLs may not carry credentials"),
    ("https://media.internal:8443/a.mp4", "port 8443 of 'media.internal' is not on"),
])
def test_a_url_off_the_allowlist_is_refused_naming_the_url_field(url, message):
    found = violations(request(video(url=url)))
    assert message in found.get("messages[0].parts[0].video.url", ""), found


def test_a_video_without_a_source_is_refused():
    assert "set either data or url" in violations(request(video()))["messages[0].parts[0].video"]


@pytest.mark.parametrize("role", ["system", "assistant", "tool"])
def test_a_video_outside_a_user_message_is_refused(role):
    found = violations(request(video(data=good_clip()), role=role))
    assert (f"videos go in user messages only, not in a message of role {role!r}"
            in found.get("messages[0].parts[0].video", "")), found


def test_more_videos_than_the_limit_are_refused_before_any_is_probed(spies):
    assert violations(request(*[video(data=good_clip())] * 5)) == {
        "messages": "5 videos is over the limit of 4 per request"}
    assert spies == []
    assert len(validate(request(*[video(data=good_clip())] * 4), SETTINGS, stream=False).videos) == 4


def test_every_violation_of_a_request_is_reported_together():
    found = violations(request(video(fps=50, data=good_clip()), video(data=b"nope"), text("x"),
                               video(max_frames=1, data=audio_only()), video(url="https://evil.example/v.mp4")))
    assert set(found) == {"messages[0].parts[0].video.fps", "messages[0].parts[1].video.data",
                          "messages[0].parts[3].video.max_frames", "messages[0].parts[3].video.data",
                          "messages[0].parts[4].video.url"}, found
    assert "audio only" in found["messages[0].parts[3].video.data"]


def test_video_limits_come_from_the_environment():
    settings = Settings.from_env({"VLM_API_KEYS": "k", "VLM_MAX_VIDEOS": "1", "VLM_MAX_VIDEO_BYTES": "1000"})
    assert (settings.max_videos, settings.max_video_bytes) == (1, 1000)
    assert (Settings().max_videos, Settings().max_video_bytes) == (4, 64 * 1024 * 1024)
    assert violations(request(video(data=good_clip()), video(data=good_clip())), settings) == {
        "messages": "2 videos is over the limit of 1 per request"}
    assert "over the limit of 1000 bytes" in violations(request(video(data=good_clip())), settings)[
        "messages[0].parts[0].video.data"]


# --- the gateway's gRPC server: what reaches the backend, Triton's errors, the key first --------------


def test_the_servicer_sends_the_clips_beside_the_messages_and_maps_triton_video_errors_to_fields():
    async def test(stub, backend, gw, channel):
        first, second = good_clip(), clip(frames=5, codec="libvpx")
        asked = request(video(data=first), video(fps=1, data=second), text("What changes?"))
        await stub.Generate(asked, metadata=KEY)
        ensemble, messages, images, params = backend.calls[0]
        assert ensemble == "qwen2_5_vl" and images == [] and backend.videos == [[first, second]]
        assert messages[0]["content"][:2] == [{"type": "video", "fps": 2.0, "max_frames": 32},
                                              {"type": "video", "fps": 1.0, "max_frames": 32}]

        backend.script = [InferenceServerException(
            "in ensemble 'qwen2_5_vl', INVALID_ARGUMENT: video 1: truncated WebM data: frames stop at 0.20 s")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(asked, metadata=KEY)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(caught.value) == [("messages[0].parts[1].video.data",
                                                   "truncated WebM data: frames stop at 0.20 s")]

    run(test)


def test_a_clip_whose_header_hides_that_it_has_no_frames_is_refused_by_triton_naming_its_field():
    # Its length comes from the audio beside an empty video track: only decoding finds no frames.
    with pytest.raises(VideoError) as decoding:
        decode_video(zero_length())
    assert "no frames (zero length)" in str(decoding.value)

    async def test(stub, backend, gw, channel):
        asked = request(video(data=zero_length()), text("What happens?"))
        backend.script = [InferenceServerException(f"in ensemble 'qwen2_5_vl', INVALID_ARGUMENT: {decoding.value}")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(asked, metadata=KEY)
        [(field, description)] = field_violations(caught.value)
        assert field == "messages[0].parts[0].video.data" and "no frames (zero length)" in description
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk(gw).chat.completions.create(model="qwen2.5-vl", messages=ask(zero_length()))
        assert refused.value.body["param"] == "messages[0].content[1].video_url.url"
        assert "no frames (zero length)" in refused.value.body["message"]

    run(test)


def test_a_slow_video_header_never_holds_up_other_callers(monkeypatch):
    # A long WebM recorded live takes up to 0.1 s to probe (its packets are scanned for its length).
    probing = threading.Event()

    def slow_probe(*args, **kwargs):
        probing.set()
        time.sleep(1.0)
        return probe_video(*args, **kwargs)

    monkeypatch.setattr(video_module, "probe_video", slow_probe)

    async def test(stub, backend, gw, channel):
        with_video = asyncio.ensure_future(stub.Generate(request(video(data=good_clip())), metadata=KEY))
        for _ in range(1000):
            if probing.is_set():
                break
            await asyncio.sleep(0.01)
        assert probing.is_set(), "the video's header was never probed"
        started = time.monotonic()
        await stub.Generate(request(text("meanwhile")), metadata=KEY)
        assert time.monotonic() - started < 0.5 and not with_video.done()
        assert (await with_video).text == "Hello"

    run(test)


def test_nothing_of_a_video_is_read_before_the_key_is_checked(monkeypatch):
    probed = []
    monkeypatch.setattr(video_module, "probe_video", lambda *a, **k: probed.append(a))
    monkeypatch.setattr(validation, "probe_video", lambda *a, **k: probed.append(a))

    async def test(stub, backend, gw, channel):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request(video(data=good_clip())), metadata=(("authorization", "Bearer wrong"),))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(openai.AuthenticationError):
            await sdk(gw, key="wrong").chat.completions.create(model="qwen2.5-vl", messages=ask(good_clip()))
        assert probed == [] and backend.calls == []

    run(test)


def test_triton_errors_about_a_video_name_its_field_and_images_keep_theirs():
    images, videos = ["messages[0].parts[0].image.data"], ["messages[0].parts[1].video.data", "messages[1].parts[0].video.url"]
    for message, field in [("video 1: frames run past the limit of 600 s", "messages[1].parts[0].video.url"),
                           ("image 0: truncated or corrupt PNG data", "messages[0].parts[0].image.data")]:
        error = to_api_error(InferenceServerException(f"in ensemble 'qwen2_5_vl', INVALID_ARGUMENT: {message}"),
                             "qwen2.5-vl", images, videos)
        assert error.violations == [(field, message.split(": ", 1)[1])]
    # A video index the request does not have (never expected) names the messages, not a wrong field.
    error = to_api_error(InferenceServerException("INVALID_ARGUMENT: video 2: corrupt"), "qwen2.5-vl", images, videos)
    assert error.violations == [("messages", "video 2: corrupt")]


# --- Triton's wire: the VIDEOS tensor -----------------------------------------------------------------


class RecordingTriton(fake_triton.FakeTriton):
    """The Triton stand-in, keeping every request it receives."""

    def __init__(self):
        super().__init__()
        self.requests: list[service_pb2.ModelInferRequest] = []

    async def ModelStreamInfer(self, request_iterator, context):
        async def recorded():
            async for request in request_iterator:
                self.requests.append(request)
                yield request

        await super().ModelStreamInfer(recorded(), context)


def tensors(request: service_pb2.ModelInferRequest) -> dict[str, tuple[list[int], list]]:
    """Each BYTES input's shape and elements."""
    return {tensor.name: (list(tensor.shape), list(deserialize_bytes_tensor(raw)))
            for tensor, raw in zip(request.inputs, request.raw_input_contents) if tensor.datatype == "BYTES"}


def test_the_clips_travel_as_the_videos_tensor_and_count_as_large_request_bytes(monkeypatch):
    monkeypatch.setattr(fake_triton, "FakeTriton", RecordingTriton)
    first, second = good_clip(), clip(frames=5, codec="libvpx")
    messages = [{"role": "user", "content": [{"type": "video", "fps": 2.0, "max_frames": 32},
                                             {"type": "video", "fps": 1.0, "max_frames": 8},
                                             {"type": "text", "text": json.dumps({"n": 1})}]}]

    async def main():
        server, fake, port = await start_fake_triton()
        try:
            for large_request_bytes in (10 * len(first), len(first)):
                backend = TritonBackend(f"127.0.0.1:{port}", large_request_bytes=large_request_bytes)
                try:
                    for _ in range(2):
                        async for _ in backend.generate("qwen2_5_vl", messages, [], PARAMS, "req",
                                                        videos=[first, second]):
                            pass
                finally:
                    await backend.close()
        finally:
            await server.stop(0)
        return fake

    fake = asyncio.run(main())
    sent = tensors(fake.requests[0])
    assert sent["VIDEOS"] == ([1, 2], [first, second]) and "IMAGES" not in sent
    assert json.loads(sent["MESSAGES"][1][0]) == messages
    assert all(tensors(r)["VIDEOS"] == sent["VIDEOS"] for r in fake.requests)
    # Under the large-request size: both on one shared stream; over it (by the video bytes alone): a
    # stream each.
    assert fake.streams_opened == 1 + 2


# --- video URLs: fetched under the same rules as image URLs, with the video's limits --------------------


def test_a_video_url_is_fetched_with_the_video_byte_limit_and_its_header_checked():
    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    for body, settings_changes, problem in [
        (good_clip(), {}, None),  # over the image byte limit: a video has its own
        (audio_only(), {}, "the MP4 file has audio only, no video stream; send a video"),
        (good_clip(), {"max_video_bytes": 100}, "over the limit of 100 bytes"),
        (bad_clip("too many pixels"), {}, "9 frames of 3840x2160 = 74649600 pixels is over the budget"),
    ]:
        with http_host(serving_file(body)) as host:
            settings = Settings(api_keys=frozenset({"k"}), image_url_allowlist=(host,), max_image_bytes=100,
                                image_url_allowed_networks=loopback, **settings_changes)
            sources = [VideoSource(field="messages[0].parts[0].video.url", url=f"http://{host}/clip")]
            if problem is None:
                assert asyncio.run(fetch_all(sources, settings)) == [body]
                continue
            with pytest.raises(ApiError) as caught:
                asyncio.run(fetch_all(sources, settings))
            [(field, description)] = caught.value.violations
            assert field == "messages[0].parts[0].video.url" and problem in description, description


def test_images_and_videos_of_a_request_share_its_byte_budget():
    sources = [validation.ImageSource(field="messages[0].parts[0].image.data", data=PNG),
               VideoSource(field="messages[0].parts[1].video.data", data=good_clip())]
    settings = Settings(api_keys=frozenset({"k"}), max_request_image_bytes=len(PNG) + len(good_clip()) - 1)
    with pytest.raises(ApiError, match="the request's images and videos add up to more than"):
        asyncio.run(fetch_all(sources, settings))


# --- the OpenAI-compatible API: video_url parts -----------------------------------------------------


def sdk(gw, key="secret") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key=key, max_retries=0)


def data_url(data: bytes, media_type: str = "video/mp4") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def ask(data: bytes, role: str = "user", **sampling) -> list[dict]:
    return [{"role": role, "content": [{"type": "text", "text": "What happens?"},
                                       {"type": "video_url", "video_url": {"url": data_url(data), **sampling}}]}]


def test_a_video_url_part_is_the_grpc_video_part():
    async def test(stub, backend, gw, channel):
        webm = clip(frames=5, codec="libvpx")
        messages = ask(good_clip(), fps=0.5, max_frames=8)
        messages[0]["content"].append({"type": "video_url", "video_url": {"url": data_url(webm, "video/webm")}})
        answer = await sdk(gw).chat.completions.create(model="qwen2.5-vl", messages=messages)
        assert answer.choices[0].message.content == "Hello"
        ensemble, sent, images, params = backend.calls[0]
        assert backend.videos == [[good_clip(), webm]]
        assert sent == [{"role": "user", "content": [{"type": "text", "text": "What happens?"},
                                                      {"type": "video", "fps": 0.5, "max_frames": 8},
                                                      {"type": "video", "fps": 2.0, "max_frames": 32}]}]

    run(test)


@pytest.mark.parametrize("kind", list(BAD_CLIPS))
def test_each_bad_clip_is_a_400_naming_the_video_url(kind):
    async def test(stub, backend, gw, channel):
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk(gw).chat.completions.create(model="qwen2.5-vl", messages=ask(bad_clip(kind)))
        assert caught.value.body["param"] == "messages[0].content[1].video_url.url", caught.value.body
        assert BAD_CLIP_ERRORS[kind] in caught.value.body["message"], caught.value.body
        assert backend.calls == []

    run(test, **({"max_video_bytes": 20_000} if kind == "too big" else {}))


@pytest.mark.parametrize("messages,param,message", [
    (ask(b"", fps=40), "messages[0].content[1].video_url.fps", "40 is out of range"),
    (ask(b"", fps=0), "messages[0].content[1].video_url.fps", "fps 0 is out of range; leave fps out for its default"),
    (ask(b"", fps=-2), "messages[0].content[1].video_url.fps", "-2 is out of range"),
    (ask(b"", max_frames=1), "messages[0].content[1].video_url.max_frames", "1 is out of range"),
    (ask(b"", max_frames=0), "messages[0].content[1].video_url.max_frames", "max_frames 0 is out of range"),
    (ask(b"", max_frames=2**40), "messages[0].content[1].video_url.max_frames", "less than or equal to 2147483647"),
    (ask(b"", fps="fast"), "messages[0].content[1].video_url.fps", "a valid number"),
    (ask(b"", role="system"), "messages[0].content[1]", "videos go in user messages only, not in a message of role "
                                                        "'system'"),
    (ask(b"", role="developer"), "messages[0].content[1]", "not in a message of role 'system'"),
    (ask(b"", role="assistant"), "messages[0].content[1]", "not in a message of role 'assistant'"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://elsewhere.example/v.mp4"}}]}],
     "messages[0].content[0].video_url.url", "not on this service's image URL allowlist"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:text/plain;base64,AAAA"}}]}],
     "messages[0].content[0].video_url.url", "a video data URL must be data:video/<type>;base64,<data>"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@"}}]}],
     "messages[0].content[0].video_url.url", "the data URL's base64 does not decode"),
    ([{"role": "user", "content": [{"type": "video_url"}]}], "messages[0].content[0].video_url",
     "a video_url part needs video_url.url"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(b"")}}] * 5}],
     "messages", "5 videos is over the limit of 4 per request"),
])
def test_bad_video_url_parts_are_400s_naming_the_field(messages, param, message):
    for part in messages[0]["content"]:  # the sampling cases need a clip that is good otherwise
        if part.get("video_url", {}).get("url") == data_url(b""):
            part["video_url"]["url"] = data_url(good_clip())

    async def test(stub, backend, gw, channel):
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk(gw).chat.completions.create(model="qwen2.5-vl", messages=messages)
        assert caught.value.body["param"] == param, caught.value.body
        assert message in caught.value.body["message"], caught.value.body
        assert backend.calls == []

    run(test)


def test_a_triton_error_about_a_video_names_its_video_url():
    async def test(stub, backend, gw, channel):
        backend.script = [InferenceServerException("in ensemble 'qwen2_5_vl', INVALID_ARGUMENT: video 0: truncated "
                                                   "MP4 data: frames stop at 0.40 s of the 1.00 s its header gives")]
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk(gw).chat.completions.create(model="qwen2.5-vl", messages=ask(good_clip()))
        assert caught.value.body["param"] == "messages[0].content[1].video_url.url"
        assert "frames stop at 0.40 s" in caught.value.body["message"]

    run(test)


def test_the_openapi_description_has_the_video_part_and_its_bounds():
    async def test(stub, backend, gw, channel):
        async with httpx.AsyncClient() as client:
            document = (await client.get(f"http://127.0.0.1:{gw.http_port}/openapi.json")).json()
        schemas = document["components"]["schemas"]
        assert "video_url" in schemas["ContentPart"]["properties"]["type"]["enum"]
        video_url = schemas["VideoURL"]["properties"]
        assert (video_url["fps"]["exclusiveMinimum"], video_url["fps"]["maximum"]) == (0, 30)
        assert (video_url["max_frames"]["minimum"], video_url["max_frames"]["maximum"]) == (2, 256)

    run(test)
