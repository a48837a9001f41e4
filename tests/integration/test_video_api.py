"""Videos through the real gateway and Triton with the official `openai` SDK: `video_url` parts as data
URLs and as allowlisted URLs, both families and `auto`, answers equal to the ensembles' own for the same
clip and sampling, and refusals from either side naming the part's field."""

from __future__ import annotations

import base64

import openai
import pytest

from tests.conftest import http_host, serving_file
from tests.integration.conftest import start_gateway
from tests.integration.test_openai_api import sdk
from tests.integration.test_video_pipeline import CLIP, video_messages
from vlm_serving.ensemble_client import generate

pytestmark = pytest.mark.integration
DATA_URL = "data:video/mp4;base64," + base64.b64encode(CLIP).decode()
FAMILY = {"qwen2.5-vl": "qwen2_5_vl", "pixtral": "pixtral"}


def ask(url: str = DATA_URL, text: str = "What moves in this clip?", **sampling) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **sampling}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def clip_host():
    with http_host(serving_file(CLIP)) as host:
        yield host


@pytest.fixture(scope="module")
def video_gateway(triton, clip_host, tmp_path_factory):
    gateway = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("video-gateway"),
                            VLM_IMAGE_URL_ALLOWLIST=clip_host, VLM_IMAGE_URL_ALLOWED_NETWORKS="127.0.0.0/8")
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral"])
def test_a_clip_as_a_data_url_is_answered_as_the_ensemble_answers_it(triton, video_gateway, model):
    client = sdk(video_gateway)
    answer = client.chat.completions.create(model=model, messages=ask(), max_tokens=10)
    # The gateway's defaults (2 fps, at most 32 frames) reach the ensemble as sampling of the clip.
    direct = generate(triton.grpc_url, FAMILY[model], video_messages(fps=2.0, max_frames=32), [], videos=[CLIP],
                      max_tokens=10)
    assert answer.choices[0].message.content == direct.text
    assert answer.usage.prompt_tokens == direct.prompt_tokens > direct.image_tokens > 0
    chunks = list(client.chat.completions.create(model=model, messages=ask(), max_tokens=10, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.text


def test_sampling_and_an_allowlisted_url_reach_the_model(triton, video_gateway, clip_host):
    client = sdk(video_gateway)
    fewer = client.chat.completions.create(model="qwen2.5-vl", max_tokens=4,
                                           messages=ask(f"http://{clip_host}/clip.mp4", fps=1, max_frames=4))
    direct = generate(triton.grpc_url, "qwen2_5_vl", video_messages(fps=1.0, max_frames=4), [], videos=[CLIP],
                      max_tokens=4)
    assert fewer.choices[0].message.content == direct.text and fewer.usage.prompt_tokens == direct.prompt_tokens
    default = client.chat.completions.create(model="qwen2.5-vl", messages=ask(), max_tokens=4)
    assert default.usage.prompt_tokens > fewer.usage.prompt_tokens, "8 frames take more tokens than 4"


def test_auto_answers_a_clip_with_qwen(video_gateway):
    answer = sdk(video_gateway).chat.completions.create(model="auto", messages=ask(), max_tokens=6)
    route = answer.model_extra["vlm"]["route"]
    assert answer.model == "qwen2.5-vl" and route["reason"] == "ROUTE_REASON_VIDEO"
    assert [attempt["model"] for attempt in route["attempts"]] == ["qwen2.5-vl"]


def test_refusals_name_the_part_from_the_gateway_and_from_triton(video_gateway):
    client = sdk(video_gateway)
    refusals = [
        (ask(fps=31), "messages[0].content[0].video_url.fps", "at most 30"),
        (ask("data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42").decode()),
         "messages[0].content[0].video_url.url", "video"),
        (ask("https://elsewhere.example/clip.mp4"), "messages[0].content[0].video_url.url", "allowlist"),
    ]
    # Damage inside the H.264 frames: the container's header is whole (the gateway's checks pass) and
    # Triton's decoding refuses the clip, which the gateway names by its part.
    damaged = bytearray(CLIP)
    middle = len(damaged) // 2
    damaged[middle:middle + 400] = bytes(400)
    refusals.append((ask("data:video/mp4;base64," + base64.b64encode(bytes(damaged)).decode()),
                     "messages[0].content[0].video_url.url", "corrupt"))
    for messages, field, words in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="pixtral", messages=messages, max_tokens=4)
        assert refused.value.body["param"] == field, refused.value.body
        assert words in refused.value.body["message"], refused.value.body
    assert client.chat.completions.create(model="pixtral", messages=ask(), max_tokens=4).choices[0].message.content
