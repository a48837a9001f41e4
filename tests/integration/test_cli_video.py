"""`vlm generate --video` and `vlm batch` with videos against the real stack (issue 27, item 4):
both families answer a clip, `auto` routes it to Qwen2.5-VL, the sampling asked reaches the
service, a task for images only and a corrupt clip are refused by name, a folder's clips are items."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import encode, picture
from tests.integration.conftest import KEY
from tests.integration.test_video_pipeline import moving_square
from tests.unit.test_video import encode as encode_clip

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 4 s MP4 (H.264) and a 3 s WebM (VP9) at 8 fps, and a PNG."""
    folder = tmp_path_factory.mktemp("clips")
    (folder / "square.mp4").write_bytes(encode_clip("h264", frames=32, rate=8, size=(96, 72), paint=moving_square))
    (folder / "square.webm").write_bytes(encode_clip("vp9", frames=24, rate=8, size=(96, 72), paint=moving_square))
    (folder / "photo.png").write_bytes(encode(picture(64, 48, seed=3)))
    return folder


def vlm(gateway, *args) -> subprocess.CompletedProcess:
    """The installed CLI as a user runs it, in its own process."""
    command = [sys.executable, "-m", "vlm_client.cli", "--address", gateway.address, *map(str, args)]
    return subprocess.run(command, env={**os.environ, "VLM_API_KEY": KEY}, capture_output=True, text=True,
                          timeout=300)


def status(result: subprocess.CompletedProcess) -> dict[str, str]:
    """The fields of the CLI's status line on stderr ([model=... prompt_tokens=... route=...])."""
    line = next(line for line in result.stderr.splitlines() if line.startswith("[model="))
    return dict(re.findall(r"(\w+)=(\S+?)(?=\s\w+=|\]$)", line))


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral"])
def test_each_family_answers_a_clip_and_reads_more_frames_when_asked(gateway, clips, model):
    fewer = vlm(gateway, "generate", "--model", model, "--video", clips / "square.mp4", "--max-frames", "4",
                "--max-tokens", "4", "--temperature", "0", "What moves?")
    assert fewer.returncode == 0, fewer.stderr
    more = vlm(gateway, "generate", "--model", model, "--video", clips / "square.mp4", "--fps", "2", "--max-frames",
               "8", "--max-tokens", "4", "--temperature", "0", "What moves?")
    assert more.returncode == 0, more.stderr
    fewer_status, more_status = status(fewer), status(more)
    assert fewer_status["model"] == more_status["model"] == model
    assert fewer_status["completion_tokens"] == more_status["completion_tokens"] == "4"
    # 8 frames sampled instead of 4: more prompt tokens stand for the clip.
    assert int(more_status["prompt_tokens"]) > int(fewer_status["prompt_tokens"]) > 0, (fewer.stderr, more.stderr)


def test_a_clip_streams_the_same_answer_and_auto_sends_it_to_qwen(gateway, clips):
    args = ("--video", clips / "square.webm", "--max-tokens", "8", "--temperature", "0", "Describe the clip.")
    unary = vlm(gateway, "generate", "--model", "qwen2.5-vl", *args)
    streamed = vlm(gateway, "generate", "--model", "qwen2.5-vl", "--stream", *args)
    assert unary.returncode == streamed.returncode == 0, unary.stderr + streamed.stderr
    assert streamed.stdout == unary.stdout and unary.stdout.strip()
    routed = vlm(gateway, "generate", "--model", "auto", *args)
    assert routed.returncode == 0, routed.stderr
    assert status(routed)["model"] == "qwen2.5-vl" and status(routed)["route"].startswith("video:qwen2.5-vl")
    assert routed.stdout == unary.stdout  # the same model, greedy: the same answer


def test_caption_takes_a_clip_and_a_task_for_images_is_refused_by_name(gateway, clips):
    caption = vlm(gateway, "generate", "--model", "qwen2.5-vl", "--task", "caption", "--video", clips / "square.mp4",
                  "--image", clips / "photo.png", "--max-tokens", "6", "Caption it.")
    assert caption.returncode == 0, caption.stderr
    assert "--- caption" in caption.stdout or "[no result:" in caption.stdout  # 6 tokens may cut the caption
    for task in ("ocr", "grounding", "document", "chart"):
        refused = vlm(gateway, "generate", "--model", "qwen2.5-vl", "--task", task, "--video", clips / "square.mp4",
                      "Read it.")
        assert refused.returncode == 1 and "error: INVALID_ARGUMENT:" in refused.stderr, refused.stderr
        assert "task" in refused.stderr and task in refused.stderr and "Traceback" not in refused.stderr


def test_a_corrupt_clip_is_refused_by_the_service_naming_its_part(gateway, clips, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes((clips / "square.mp4").read_bytes()[:600])  # the header's start, then nothing
    result = vlm(gateway, "generate", "--model", "qwen2.5-vl", "--image", clips / "photo.png", "--video", corrupt,
                 "What moves?")
    assert result.returncode == 1 and "error: INVALID_ARGUMENT:" in result.stderr, result.stderr
    assert "messages[0].parts[1].video" in result.stderr and "Traceback" not in result.stderr
    not_a_clip = vlm(gateway, "generate", "--model", "qwen2.5-vl", "--video", clips / "photo.png", "What moves?")
    assert not_a_clip.returncode == 1 and "is not a video the service reads" in not_a_clip.stderr


def test_a_folders_clips_are_batch_items_with_the_sampling_asked(gateway, clips, tmp_path):
    output = tmp_path / "out.jsonl"
    result = vlm(gateway, "batch", clips, "--output", output, "--model", "qwen2.5-vl", "--prompt", "What moves?",
                 "--max-tokens", "4", "--fps", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    records = {record["id"]: record for record in map(json.loads, output.read_text().splitlines())}
    assert set(records) == {"square.mp4", "square.webm", "photo.png"}
    assert records["square.mp4"]["input"]["videos"] == [str(clips / "square.mp4")]
    assert records["square.mp4"]["input"]["fps"] == 1 and "videos" not in records["photo.png"]["input"]
    assert all(record["usage"]["completion_tokens"] == 4 for record in records.values())
    assert "done 3, failed 0" in result.stderr and "1 images, 2 videos in" in result.stderr
