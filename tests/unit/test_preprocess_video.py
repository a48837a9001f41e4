"""Videos in a request's preprocessing: the clip's parts, its frames in the prompt (Pixtral: as images,
Qwen2.5-VL: its native video tokens, in reading order beside images), and the checks made from the
container's header before anything is decoded. The Qwen video tensors' equality with transformers'
video processor is tests/unit/test_qwen_video.py's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import encode, picture
from tests.unit.test_video import encode as encode_clip
from tests.unit.test_video import grey
from vlm_serving.preprocessing import preprocess
from vlm_serving.preprocessing.chat import MessageError, parse_messages, videos_as_frames
from vlm_serving.preprocessing.images import ImageError
from vlm_serving.preprocessing.preprocess import VIDEO_CLIP_TOKENS, load_preprocessor
from vlm_serving.preprocessing.video import VideoError, VideoLimits, decode_video
from vlm_serving.tasks import TaskError


def video_part(fps: float = 2.0, max_frames: int = 32) -> dict:
    return {"type": "video", "fps": fps, "max_frames": max_frames}


def user(*parts: dict, text: str = "What happens?") -> str:
    return json.dumps([{"role": "user", "content": [*parts, {"type": "text", "text": text}]}])


@pytest.fixture(scope="module")
def pixtral(checkpoints):
    return load_preprocessor("pixtral", checkpoints / "pixtral")


@pytest.fixture(scope="module")
def qwen(checkpoints):
    return load_preprocessor("qwen2_5_vl", checkpoints / "qwen2_5_vl")


# A 5 s clip at 10 fps: sampled at 2 fps, 10 frames, at 0.0, 0.5, ... 4.5 s (frames 0, 5, ... 45).
CLIP = encode_clip(frames=50, rate=10, size=(96, 64))


def test_pixtral_reads_a_clip_as_its_sampled_frames_in_time_order(pixtral):
    result = pixtral([], user(video_part()), encoded_videos=[CLIP])
    sampled = decode_video(CLIP, 2.0, 32)
    assert result.video_frames == [10] and len(result.images) == 10
    # The prompt is the one a request with the ten frames as image parts gets.
    frames_prompt = json.dumps(videos_as_frames(parse_messages(user(video_part())), [10]))
    as_images = pixtral.tokenizer.prompt_ids(json.loads(frames_prompt))
    image_parts = pixtral.tokenizer.prompt_ids(parse_messages(user(*[{"type": "image"}] * 10)))
    assert as_images == image_parts
    # Each frame's patches are that frame's, at the clip's per-frame size, in time order (the clip's
    # frames are distinct greys: test_the_clips_sampled_frames_are_distinct).
    frame_range = pixtral.frame_range(10, None)
    size = pixtral.checked_target_size(96, 64, 0, frame_range)
    for frame, inputs in zip(sampled.frames, result.images):
        assert np.array_equal(inputs["pixel_values"], pixtral.patchify(frame, size)["pixel_values"])
    assert result.image_tokens == 10 * len(pixtral.placeholder_ids(*size))
    assert result.processed_sizes == [], "frames are not the request's images"


def test_pixtral_frames_share_the_clip_token_budget(pixtral):
    wide = pixtral.frame_range(256, None)
    assert wide.max_pixels == max(16 * 16, VIDEO_CLIP_TOKENS * 16 * 16 // 256)
    few = pixtral.frame_range(2, None)
    assert few.max_pixels == pixtral.presets.range_for(preprocess.ImageKind.PHOTO, None).max_pixels


@pytest.mark.parametrize("order", [("image", "video", "image"), ("video", "image")])
def test_images_and_clips_keep_their_reading_order(qwen, pixtral, order):
    images = [encode(picture(56, 56, seed=i)) for i in range(order.count("image"))]
    parts = [{"type": "image"} if kind == "image" else video_part(max_frames=4) for kind in order]
    for preprocessor in (qwen, pixtral):
        result = preprocessor(images, user(*parts), encoded_videos=[CLIP])
        alone = [preprocessor([data], user({"type": "image"})).images[0] for data in images]
        clip = preprocessor([], user(video_part(max_frames=4)), encoded_videos=[CLIP]).images
        expected = []
        for kind in order:
            expected += [alone.pop(0)] if kind == "image" else clip
        assert len(result.images) == len(expected)
        for ours, reference in zip(result.images, expected):
            assert np.array_equal(ours["pixel_values"], reference["pixel_values"])


def test_qwen_reads_a_clip_as_video_tokens_with_its_grid_and_timing(qwen):
    result = qwen([], user(video_part(fps=2.0, max_frames=32)), encoded_videos=[CLIP])
    grid = result.language_tensors["video_grid_thw"]
    assert grid.shape == (1, 3) and grid[0, 0] == 5, "ten frames: five temporal patches of two"
    assert result.language_tensors["image_grid_thw"].shape == (0, 3)
    video_tokens = int(grid.prod()) // qwen.merge**2
    assert int((result.input_ids == qwen.video_pad_id).sum()) == video_tokens == result.image_tokens
    assert not (result.input_ids == qwen.image_pad_id).any()
    # Sampled at 2 fps: each temporal patch of two frames spans one second.
    assert result.language_tensors["second_per_grid_ts"].tolist() == [1.0]
    assert len(result.images) == 1 and result.images[0]["pixel_values"].shape[0] == int(grid.prod())
    assert qwen.clip_token_count(10, 96, 64, 0, None) == video_tokens


def test_qwen_text_only_requests_send_empty_video_tensors(qwen):
    result = qwen([], json.dumps([{"role": "user", "content": "Hi"}]))
    assert result.language_tensors["video_grid_thw"].shape == (0, 3)
    assert result.language_tensors["second_per_grid_ts"].shape == (0,)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "pixtral"])
def test_a_clip_over_the_context_is_refused_from_its_header_before_decoding(name, checkpoints, monkeypatch):
    preprocessor = load_preprocessor(name, checkpoints / name)
    long_clip = encode_clip(frames=64, rate=1, size=(320, 240))  # 64 s: 64 frames at 1 fps
    monkeypatch.setattr(preprocess.Clip, "decode", lambda *args: pytest.fail("decoded a clip over the context"))
    tokens = preprocessor.clip_token_count(64, 320, 240, 0, None)
    with pytest.raises(ImageError) as caught:
        preprocessor([], user(video_part(fps=1.0, max_frames=64)), encoded_videos=[long_clip],
                     max_tokens=preprocessor.max_context - tokens + 1)
    assert f"{tokens} video tokens" in str(caught.value) and "lower fps or max_frames" in str(caught.value)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "pixtral"])
def test_bad_video_requests_are_refused_naming_the_clip(name, checkpoints):
    preprocessor = load_preprocessor(name, checkpoints / name, max_videos=1, video_limits=VideoLimits(max_frames=16))
    with pytest.raises(VideoError, match=r"messages hold 1 video part\(s\) but 0 video\(s\) were sent"):
        preprocessor([], user(video_part()))
    with pytest.raises(VideoError, match="2 videos is over the limit of 1 per request"):
        preprocessor([], user(video_part(), video_part()), encoded_videos=[CLIP, CLIP])
    with pytest.raises(VideoError, match="video 0: max_frames 20 is over the limit of 16 frames per clip"):
        preprocessor([], user(video_part(max_frames=20)), encoded_videos=[CLIP])
    with pytest.raises(VideoError, match="video 0: .*truncated or corrupt|video 0: .*no frames"):
        preprocessor([], user(video_part(max_frames=8)), encoded_videos=[CLIP[: len(CLIP) // 3]])
    with pytest.raises(VideoError, match="not a supported video file"):
        preprocessor([], user(video_part(max_frames=8)), encoded_videos=[encode(picture(8, 8))])


@pytest.mark.parametrize("part,error", [
    (video_part(fps=0.0), r"content\[0\]\.fps: 0\.0: frames to sample per second, greater than 0 and at most 30"),
    (video_part(fps=31.0), r"\.fps: 31\.0"),
    ({"type": "video", "max_frames": 8}, r"\.fps: None"),
    (video_part(max_frames=1), r"content\[0\]\.max_frames: 1: the most frames to sample, 2 to 256"),
    (video_part(max_frames=True), r"\.max_frames: True"),
])
def test_bad_video_parts_are_refused_naming_the_field(part, error):
    with pytest.raises(MessageError, match=error):
        parse_messages(user(part))


@pytest.mark.parametrize("role", ["system", "assistant", "tool"])
def test_only_user_messages_hold_videos(role):
    messages = [{"role": role, "content": [video_part()]}]
    with pytest.raises(MessageError, match=f"a {role} message cannot hold a video; send videos in a user message"):
        parse_messages(json.dumps(messages))


def test_the_clips_sampled_frames_are_distinct():
    """The clip the tests use: its frames at 0.0, 0.5, ... 4.5 s are frames 0, 5, ... 45, distinct greys
    among the first five (the order tests rely on it)."""
    levels = [int(np.asarray(frame).mean()) for frame in decode_video(CLIP, 2.0, 32).frames]
    assert all(abs(level - grey(5 * i)) <= 3 for i, level in enumerate(levels))
    assert len(set(levels[:5])) == 5


@pytest.mark.parametrize("name", ["qwen2_5_vl", "pixtral"])
def test_caption_and_vqa_tasks_read_clips_and_the_image_tasks_refuse_them(name, checkpoints):
    preprocessor = load_preprocessor(name, checkpoints / name)
    captioned = preprocessor([], user(video_part(max_frames=4), text=""), task="caption", encoded_videos=[CLIP])
    prompt = preprocessor.tokenizer.decode(captioned.input_ids.tolist())
    assert "Describe this video in one or two sentences." in prompt
    asked = preprocessor([], user(video_part(max_frames=4), text="What colour is it?"), task="vqa", encoded_videos=[CLIP])
    assert "What colour is it?\nAnswer the question briefly." in preprocessor.tokenizer.decode(asked.input_ids.tolist())
    for task in ("ocr", "document", "grounding", "chart"):
        with pytest.raises(TaskError, match=f"task {task} reads images only \\(tasks for videos: caption, vqa\\)"):
            preprocessor([], user(video_part(max_frames=4)), task=task, encoded_videos=[CLIP])
