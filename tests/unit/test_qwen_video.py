"""Qwen2.5-VL's video tensors (vlm_serving/preprocessing/qwen_video.py) against transformers' own video
processor, and the ONNX encoder's video embeddings against the transformers tower.

transformers' Qwen2VLVideoProcessor needs torchvision, which does not import beside the service's torch:
it runs in the reference environment (build/reference-env, `make reference-env`, part of `make setup`)
through tests/reference_env/qwen_video.py, arrays exchanged as .npz files. Clips are encoded here with
PyAV (solid colours and moving shapes, several sizes, odd ones, ones scaled up and down, odd frame
counts), decoded by `decode_video`, and the same sampled frames go to both sides.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from tests.conftest import REPO_ROOT
from tests.unit.test_video import encode
from vlm_serving.checkpoint_config import image_processor_config, qwen_video_processor_config
from vlm_serving.encoding.encoder import OnnxEncoder
from vlm_serving.preprocessing.qwen_video import QwenVideoProcessor, resize_frames, stacked_frames
from vlm_serving.preprocessing.video import VideoError, decode_video, probe_video, sample_times

REFERENCE_PYTHON = REPO_ROOT / "build" / "reference-env" / "bin" / "python"
REFERENCE_SCRIPT = REPO_ROOT / "tests" / "reference_env" / "qwen_video.py"


def run_reference(*arguments: str | Path) -> str:
    """tests/reference_env/qwen_video.py in the reference environment; its standard output."""
    if not REFERENCE_PYTHON.exists():
        pytest.fail(f"{REFERENCE_PYTHON} is missing: run `make reference-env` (part of `make setup`), the "
                    "environment with transformers' video processor (torchvision) these tests compare with")
    done = subprocess.run([REFERENCE_PYTHON, REFERENCE_SCRIPT, *map(str, arguments)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"the reference script failed:\n{done.stderr[-4000:]}"
    return done.stdout


def square(size: tuple[int, int], step: int = 7):
    """Paints frame i: a grey background with a red square moving right and a blue bar moving down."""
    width, height = size

    def paint(index: int) -> np.ndarray:
        pixels = np.full((height, width, 3), 90, np.uint8)
        side = max(2, min(width, height) // 3)
        x, y = (index * step) % max(1, width - side), (index * step // 2) % max(1, height - side)
        pixels[y : y + side, x : x + side] = (230, 30, 30)
        row = (index * 3) % height
        pixels[row : row + max(1, height // 10), :] = (20, 40, 220)
        return pixels

    return paint


def moving_gif(size: tuple[int, int], frames: int, duration_ms: int) -> bytes:
    paint = square(size, step=5)
    pictures = [Image.fromarray(paint(i)) for i in range(frames)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, "GIF", save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)
    return buffer.getvalue()


@dataclass(frozen=True)
class Clip:
    name: str
    data: bytes
    fps: float
    max_frames: int = 32


def clips() -> list[Clip]:
    return [
        Clip("solid h264 64x48, 4 frames", encode("h264", frames=20, rate=10, size=(64, 48)), fps=2),
        Clip("square h264 640x360 (scaled down), 6 frames",
             encode("h264", frames=30, rate=10, size=(640, 360), paint=square((640, 360), 23)), fps=2),
        Clip("square vp9 97x61 (odd size), 5 frames (odd count)",
             encode("vp9", frames=25, rate=10, size=(97, 61), paint=square((97, 61))), fps=2),
        Clip("square vp8 30x20 (scaled up), 3 frames",
             encode("vp8", frames=7, rate=7, size=(30, 20), paint=square((30, 20), 3)), fps=3),
        Clip("square h264 48x200 (tall), 3 frames",
             encode("h264", frames=10, rate=5, size=(48, 200), paint=square((48, 200), 5)), fps=1.5),
        Clip("solid h264 64x64, one frame", encode("h264", frames=1, rate=10, size=(64, 64)), fps=2),
        Clip("square gif 83x57 (odd size), 7 frames", moving_gif((83, 57), frames=7, duration_ms=200), fps=5),
        # 128 frames: each frame's maximum is capped by the clip's budget (the tiny model's context).
        Clip("square h264 640x360, 128 frames (per-frame cap)",
             encode("h264", frames=130, rate=30, size=(640, 360), paint=square((640, 360), 5)), fps=30,
             max_frames=128),
    ]


@pytest.fixture(scope="module")
def processor(checkpoints) -> QwenVideoProcessor:
    checkpoint = checkpoints / "qwen2_5_vl"
    return QwenVideoProcessor(image_processor_config(checkpoint, "qwen2_5_vl"), checkpoint)


@pytest.fixture(scope="module")
def compared(checkpoints, processor, tmp_path_factory):
    """Per clip: (clip, the decoded frames, our QwenVideo, transformers' tensors for the same frames)."""
    directory = tmp_path_factory.mktemp("qwen_video")
    cases = [(clip, decode_video(clip.data, clip.fps, clip.max_frames)) for clip in clips()]
    job = {"max_video_tokens": np.int64(processor.max_video_tokens)}
    for k, (_, video) in enumerate(cases):
        job[f"frames_{k}"] = np.stack([np.asarray(frame) for frame in video.frames])
        job[f"fps_{k}"] = np.float64(video.sampling_fps)
    np.savez(directory / "job.npz", **job)
    run_reference("process", checkpoints / "qwen2_5_vl", directory / "job.npz", directory / "out.npz")
    reference = np.load(directory / "out.npz")
    return [(clip, video, processor.process(video.frames, video.sampling_fps),
             {name: reference[f"{name}_{k}"] for name in
              ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "video_tokens")})
            for k, (clip, video) in enumerate(cases)]


def test_video_tensors_equal_transformers_video_processor(compared):
    frame_counts = {len(video.frames) for _, video, _, _ in compared}
    assert {1, 3, 5, 7, 128} <= frame_counts, "odd frame counts (padded with the last frame) and a long clip"
    for clip, video, ours, theirs in compared:
        assert np.array_equal(ours.grid_thw, theirs["video_grid_thw"][0]), clip.name
        assert ours.grid_thw[0] == math.ceil(len(video.frames) / 2), clip.name
        patches = ours.inputs["pixel_values"]
        assert patches.dtype == np.float32 and patches.shape == theirs["pixel_values_videos"].shape, clip.name
        difference = np.abs(patches - theirs["pixel_values_videos"]).max()
        assert difference <= 1e-5, f"{clip.name}: max abs difference {difference:.2e}"
        assert ours.processed_size == (ours.grid_thw[2] * 14, ours.grid_thw[1] * 14)


def test_clips_exercise_resizing_both_ways_and_motion(compared, processor):
    """The comparison covers what it claims: frames scaled up and down, the per-frame cap, and temporal
    patches whose two frames differ."""
    scaled = {"up": False, "down": False}
    for clip, video, ours, _ in compared:
        width, height = video.frames[0].size
        area, processed = width * height, ours.processed_size[0] * ours.processed_size[1]
        scaled["up"] |= processed > area
        scaled["down"] |= processed < area
    assert all(scaled.values()), scaled
    capped = [video for clip, video, _, _ in compared if len(video.frames) == 128][0]
    width, height = capped.frames[0].size
    uncapped = processor.frame_size(2, width, height)  # two frames: the budget leaves the maximum as it is
    assert processor.frame_size(128, width, height) != uncapped, "the per-frame cap must change the 128-frame size"
    moving = next(ours for clip, _, ours, _ in compared if "640x360 (scaled down)" in clip.name)
    pairs = moving.inputs["pixel_values"].reshape(-1, 3, 2, 14, 14)
    assert not np.array_equal(pairs[:, :, 0], pairs[:, :, 1]), "a temporal patch's two frames must differ"


def test_seconds_per_temporal_patch_equal_transformers(compared):
    for clip, video, ours, theirs in compared:
        assert ours.second_per_grid_t == theirs["second_per_grid_ts"][0] == 2 / video.sampling_fps, clip.name
    rates = {round(video.sampling_fps, 6) for _, video, _, _ in compared}
    assert len(rates) >= 4, f"clips sampled at several rates: {rates}"


def test_token_count_from_the_header_equals_the_tensors(compared, processor):
    for clip, video, ours, theirs in compared:
        info = probe_video(clip.data)
        frames = len(sample_times(info.duration_s, clip.fps, clip.max_frames, info.fps))
        assert frames == len(video.frames), clip.name
        header_count = processor.token_count(frames, info.width, info.height)
        assert header_count == ours.token_count == int(theirs["video_tokens"]), clip.name
        assert ours.token_count == len(ours.inputs["window_index"]), "one encoder output row per video token"


def test_resize_is_torchvisions_to_the_byte(tmp_path):
    """Frames resized here (torch's uint8 kernel, called directly on channels-last frames) equal
    torchvision's v2 resize as the video processor calls it (on channels-first frames), on many sizes:
    up, down, one side only, odd sizes, one frame."""
    rng = np.random.default_rng(7)
    sizes = [((360, 640), (252, 448)), ((61, 97), (56, 112)), ((20, 30), (56, 84)), ((200, 48), (196, 56)),
             ((57, 83), (56, 84)), ((1080, 1920), (140, 252)), ((64, 64), (64, 112)), ((99, 50), (28, 50))]
    sizes += [((int(rng.integers(2, 400)), int(rng.integers(2, 400))),
               (int(rng.integers(1, 20)) * 28, int(rng.integers(1, 20)) * 28)) for _ in range(40)]
    job, ours = {}, {}
    for k, ((height, width), target) in enumerate(sizes):
        y, x = np.mgrid[0:height, 0:width]
        smooth = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256])
        count = 1 if k % 5 == 0 else 3
        frames = np.clip(smooth[None] + rng.integers(-60, 61, (count, 3, height, width)), 0, 255).astype(np.uint8)
        job[f"frames_{k}"], job[f"size_{k}"] = frames, np.array(target)
        ours[k] = resize_frames(np.ascontiguousarray(frames.transpose(0, 2, 3, 1)), *target)
    np.savez(tmp_path / "job.npz", **job)
    run_reference("resize", tmp_path / "job.npz", tmp_path / "out.npz")
    theirs = np.load(tmp_path / "out.npz")
    for k, (source, target) in enumerate(sizes):
        assert ours[k].shape == (len(job[f"frames_{k}"]), *target, 3)
        assert np.array_equal(ours[k], theirs[f"resized_{k}"].transpose(0, 2, 3, 1)), f"{source} -> {target}"


def write_variant(directory: Path, checkpoint: Path, files: dict[str, dict]) -> Path:
    directory.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(checkpoint / name, directory / name)
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content))
    return directory


def test_video_settings_are_read_as_transformers_reads_them(checkpoints, tmp_path):
    """The files AutoVideoProcessor reads, in its order: processor_config.json's "video_processor",
    video_preprocessor_config.json, else the image processor's preprocessor_config.json."""
    checkpoint = checkpoints / "qwen2_5_vl"
    video_file = {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 4 * 28 * 28,
                  "longest_edge": 256 * 28 * 28}, "max_video_tokens": 2048, "temporal_patch_size": 2,
                  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.75]}
    folders = [
        write_variant(tmp_path / "image_file_only", checkpoint, {}),
        write_variant(tmp_path / "video_file", checkpoint, {"video_preprocessor_config.json": video_file}),
        write_variant(tmp_path / "pixel_keys", checkpoint, {"video_preprocessor_config.json": {
            "video_processor_type": "Qwen2VLVideoProcessor", "min_pixels": 5000, "max_pixels": 90000}}),
        write_variant(tmp_path / "nested", checkpoint, {
            "video_preprocessor_config.json": video_file,
            "processor_config.json": {"video_processor": {**video_file, "max_video_tokens": 999,
                                                          "size": {"shortest_edge": 3000, "longest_edge": 70000}}}}),
    ]
    theirs = json.loads(run_reference("settings", *folders))
    for folder, expected in zip(folders, theirs):
        assert expected["class"] == "Qwen2VLVideoProcessor"
        ours = qwen_video_processor_config(folder)
        for key in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size"):
            assert ours[key] == expected[key], f"{folder.name}: {key}"
        assert np.allclose(ours["image_mean"], expected["image_mean"]) and np.allclose(ours["image_std"], expected["image_std"])
        assert ours["rescale_factor"] == pytest.approx(expected["rescale_factor"])
        # None: the file sets none (transformers then assumes 128,000; the processor takes the model's context).
        assert ours["max_video_tokens"] in (None, expected["max_video_tokens"]), folder.name
    assert [qwen_video_processor_config(f)["max_video_tokens"] for f in folders] == [None, 2048, None, 999]
    assert [t["min_pixels"] for t in theirs] == [3136, 4 * 28 * 28, 5000, 3000], "each variant read from its own file"


@pytest.fixture(scope="module")
def tower(checkpoints):
    return AutoModelForImageTextToText.from_pretrained(checkpoints / "qwen2_5_vl", local_files_only=True).eval()


def test_onnx_encoder_video_embeddings_equal_the_transformers_tower(compared, tower, checkpoints):
    """Our clips' inputs through the served ONNX encoder, all clips in one call, against the transformers
    tower on transformers' own video tensors (`pixel_values_videos`, `video_grid_thw`)."""
    encoder = OnnxEncoder("qwen2_5_vl", checkpoints / "qwen2_5_vl" / "onnx", "fp32")
    ours = encoder.encode([video.inputs for _, _, video, _ in compared])
    with torch.inference_mode():
        for (clip, _, video, theirs), embeddings in zip(compared, ours):
            expected = tower.model.visual(torch.from_numpy(theirs["pixel_values_videos"]),
                                          grid_thw=torch.from_numpy(theirs["video_grid_thw"])).pooler_output.numpy()
            assert embeddings.shape == expected.shape == (video.token_count, expected.shape[1]), clip.name
            difference = np.abs(embeddings - expected).max()
            assert difference <= 1e-4, f"{clip.name}: max abs difference {difference:.2e}"
            assert np.abs(expected).max() > 0.1, "the comparison must be of non-trivial outputs"


def test_bad_clips_get_clear_errors(processor):
    with pytest.raises(VideoError, match=r"^video 2: frames of 4000x10 are over .* aspect ratio limit of 200:1"):
        processor.token_count(4, 4000, 10, index=2)
    frames = [np.zeros((28, 28, 3), np.uint8)] * 2
    with pytest.raises(ValueError, match="sampling_fps 0 must be a positive"):
        processor.process(frames, 0)
    with pytest.raises(ValueError, match="frame 1: expected uint8 RGB of 28x28"):
        stacked_frames([frames[0], np.zeros((30, 28, 3), np.uint8)])


LEAN_PROCESS = """
import sys
import numpy as np
from vlm_serving.checkpoint_config import image_processor_config
from vlm_serving.preprocessing.qwen_video import QwenVideoProcessor
checkpoint = sys.argv[1]
processor = QwenVideoProcessor(image_processor_config(checkpoint, "qwen2_5_vl"), checkpoint)
processor.token_count(32, 1920, 1080)
before = "torch" in sys.modules
processor.process([np.full((90, 160, 3), i * 20, np.uint8) for i in range(3)], 2.0)
import torch
print(before, torch.get_num_threads())
"""


def test_torch_is_imported_by_the_first_clip_only(checkpoints):
    """Counting tokens (the request budget) imports no torch; the first clip imports it, on one thread."""
    done = subprocess.run([sys.executable, "-c", LEAN_PROCESS, str(checkpoints / "qwen2_5_vl")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "1"]
