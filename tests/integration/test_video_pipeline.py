"""Videos through both ensembles and `auto` on the real Triton server: greedy tokens equal plain
transformers `generate` on the same video inputs, the encoder cache keys whole clips, and a bad
clip is refused by name while good requests around it are answered."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from tests.integration.test_encoders import counts
from tests.integration.test_ensembles import until_eos
from tests.reference import transformers_generate
from tests.unit.test_video import encode as encode_clip
from vlm_serving.ensemble_client import generate
from vlm_serving.preprocessing.preprocess import load_preprocessor
from vlm_serving.preprocessing.video import decode_video

pytestmark = pytest.mark.integration

# A 4 s clip of moving squares at 8 fps: sampled at 2 fps, 8 frames.
FPS, MAX_FRAMES = 2.0, 32


def moving_square(index: int, size=(96, 72)) -> np.ndarray:
    width, height = size
    pixels = np.full((height, width, 3), (20, 90, 160), np.uint8)
    x = (index * 3) % (width - 24)
    pixels[20:44, x:x + 24] = (240, 200, 30)
    return pixels


CLIP = encode_clip(frames=32, rate=8, size=(96, 72), paint=moving_square)


def video_messages(text: str = "What moves in this clip?", fps: float = FPS, max_frames: int = MAX_FRAMES) -> list:
    return [{"role": "user", "content": [{"type": "video", "fps": fps, "max_frames": max_frames},
                                         {"type": "text", "text": text}]}]


def qwen_reference(checkpoint, messages, clip: bytes, max_new_tokens: int) -> list[int]:
    """Plain `generate` with the clip's video inputs: input_ids, pixel_values_videos, video_grid_thw and
    second_per_grid_ts as the preprocessing step makes them (equal to transformers' own video processor:
    tests/unit/test_qwen_video.py)."""
    from transformers import AutoModelForImageTextToText

    result = load_preprocessor("qwen2_5_vl", checkpoint)([], json.dumps(messages), encoded_videos=[clip])
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
    ids = torch.from_numpy(result.input_ids)[None]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == model.config.video_token_id).to(torch.int32) * 2,
            pixel_values_videos=torch.from_numpy(np.concatenate([image["pixel_values"] for image in result.images])),
            video_grid_thw=torch.from_numpy(result.language_tensors["video_grid_thw"]),
            second_per_grid_ts=torch.from_numpy(result.language_tensors["second_per_grid_ts"]),
            max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def pixtral_reference(checkpoint, clip: bytes, max_new_tokens: int) -> list[int]:
    """Plain `generate` with the clip's sampled frames as images (how Pixtral reads a clip), at the size
    each frame is processed at."""
    preprocessor = load_preprocessor("pixtral", checkpoint)
    frames = decode_video(clip, FPS, MAX_FRAMES).frames
    edge = preprocessor.longest_edge_for(preprocessor.frame_range(len(frames), None))
    messages = [{"role": "user", "content": [{"type": "image"}] * len(frames)
                 + [{"type": "text", "text": "What moves in this clip?"}]}]
    return transformers_generate("pixtral", checkpoint, messages, frames, max_new_tokens, {"longest_edge": edge})


def test_qwen_greedy_tokens_with_a_clip_equal_plain_generate(triton, checkpoints):
    checkpoint = checkpoints / "qwen2_5_vl"
    result = generate(triton.grpc_url, "qwen2_5_vl", video_messages(), [], videos=[CLIP], max_tokens=12)
    expected = qwen_reference(checkpoint, video_messages(), CLIP, 12)
    assert result.token_ids == until_eos("qwen2_5_vl", checkpoint, expected)
    video_tokens = load_preprocessor("qwen2_5_vl", checkpoint).clip_token_count(8, 96, 72, 0, None)
    assert result.image_tokens == video_tokens > 0


def test_pixtral_greedy_tokens_with_a_clip_equal_plain_generate_on_its_frames(triton, checkpoints):
    checkpoint = checkpoints / "pixtral"
    result = generate(triton.grpc_url, "pixtral", video_messages(), [], videos=[CLIP], max_tokens=12)
    assert result.token_ids == until_eos("pixtral", checkpoint, pixtral_reference(checkpoint, CLIP, 12))
    assert result.image_tokens == load_preprocessor("pixtral", checkpoint).clip_token_count(8, 96, 72, 0, None)


def test_auto_sends_a_clip_to_qwen(triton):
    result = generate(triton.grpc_url, "auto", video_messages(), [], videos=[CLIP], max_tokens=6, stream=True)
    alone = generate(triton.grpc_url, "qwen2_5_vl", video_messages(), [], videos=[CLIP], max_tokens=6)
    assert result.route["family"] == "qwen2_5_vl" and result.route["reason"] == "video"
    assert result.token_ids == alone.token_ids


@pytest.mark.parametrize("family", ["qwen2_5_vl", "pixtral"])
def test_the_encoder_cache_keys_whole_clips(triton, family):
    clip = encode_clip(frames=16, rate=8, size=(64, 48), paint=lambda i: moving_square(i + 7, (64, 48)))
    before = counts(triton, f"{family}_encoder")[0]
    first = generate(triton.grpc_url, family, video_messages(), [], videos=[clip], max_tokens=4)
    after_first = counts(triton, f"{family}_encoder")[0]
    again = generate(triton.grpc_url, family, video_messages("And again?"), [], videos=[clip], max_tokens=4)
    assert after_first > before, "the first sight of the clip runs the encoder"
    assert counts(triton, f"{family}_encoder")[0] == after_first, "the same clip again comes from the cache"
    other_rate = generate(triton.grpc_url, family, video_messages(fps=4.0), [], videos=[clip], max_tokens=4)
    assert counts(triton, f"{family}_encoder")[0] > after_first, "other frames are another clip"
    assert first.image_tokens == again.image_tokens and other_rate.image_tokens > first.image_tokens


@pytest.mark.parametrize("family", ["qwen2_5_vl", "pixtral"])
def test_a_bad_clip_is_refused_by_name_and_good_requests_around_it_answer(triton, family):
    good = lambda: generate(triton.grpc_url, family, video_messages(), [], videos=[CLIP], max_tokens=4)
    before = good()
    for bad, error in [(CLIP[: len(CLIP) // 4], "video 0: "), (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "video 0: "),
                       (b"not a video at all", "not a supported video file")]:
        with pytest.raises(InferenceServerException, match=error):
            generate(triton.grpc_url, family, video_messages(), [], videos=[bad], max_tokens=4)
    assert good().token_ids == before.token_ids
