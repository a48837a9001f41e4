"""Videos through the Python client (issue 27, item 4): the SDK's Video messages, `vlm generate
--video`, and video items of `vlm batch`, checked on the requests a stand-in gateway receives.
The clips are real ones, encoded here with PyAV (tests/unit/test_video.py)."""

from __future__ import annotations

import re

import grpc
import pytest
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from tests.conftest import encode as encode_image
from tests.conftest import picture
from tests.unit.test_client import batch, results, serving, write_manifest
from tests.unit.test_video import encode, gif
from vlm_client import build_request, to_video
from vlm_client.cli import main as cli

SUPPORTED = "MP4 (H.264), WebM (VP8, VP9), animated GIF"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One real clip per accepted kind, and a PNG that is no video."""
    folder = tmp_path_factory.mktemp("clips")
    files = {"mp4": encode("h264", frames=20), "webm": encode("vp8", frames=20),
             "gif": gif([(255, 0, 0), (0, 0, 255)], [100, 100]), "png": encode_image(picture(20, 10))}
    for suffix, data in files.items():
        (folder / f"clip.{suffix}").write_bytes(data)
    return {suffix: folder / f"clip.{suffix}" for suffix in files}


class Recording(vlm_pb2_grpc.VisionLanguageServiceServicer):
    """Records each request; answers it, or refuses it with `refusal` (code, message) as the gateway would."""

    def __init__(self, refusal: tuple[grpc.StatusCode, str] | None = None):
        self.requests: list[vlm_pb2.GenerateRequest] = []
        self.refusal = refusal

    def Generate(self, request, context):
        self.requests.append(request)
        if self.refusal:
            context.abort(*self.refusal)
        return vlm_pb2.GenerateResponse(text="a red flash", model=request.model,
                                        finish_reason=vlm_pb2.FINISH_REASON_STOP)

    def GenerateStream(self, request, context):
        self.requests.append(request)
        yield vlm_pb2.GenerateStreamResponse(text="a red ", model=request.model)
        yield vlm_pb2.GenerateStreamResponse(text="flash", finish_reason=vlm_pb2.FINISH_REASON_STOP)


@pytest.fixture
def stand_in():
    """A stand-in gateway that records what it receives."""
    servicer = Recording()
    address, holder = serving(servicer)
    servicer.address = address
    yield servicer
    holder[0].stop(0)


def kinds(request: vlm_pb2.GenerateRequest) -> list[str]:
    return [part.WhichOneof("kind") for part in request.messages[0].parts]


# --- the SDK -----------------------------------------------------------------------------------------


def test_videos_from_paths_bytes_and_urls_with_their_sampling(clips):
    clip = to_video(clips["mp4"], fps=1, max_frames=8)
    assert (clip.data, clip.fps, clip.max_frames) == (clips["mp4"].read_bytes(), 1, 8)
    assert to_video(str(clips["webm"])).data == clips["webm"].read_bytes()
    assert to_video(clips["gif"]).data == clips["gif"].read_bytes()  # an animated GIF is a clip too
    unset = to_video(clips["mp4"].read_bytes())
    assert (unset.fps, unset.max_frames) == (0, 0)  # the service's defaults: 2 fps, 32 frames
    by_url = to_video("https://cdn.internal/clip.mp4", max_frames=4)
    assert (by_url.WhichOneof("source"), by_url.url, by_url.max_frames) == ("url", "https://cdn.internal/clip.mp4", 4)
    ready = vlm_pb2.Video(url="https://cdn.internal/a.webm", fps=3)
    assert to_video(ready) is ready
    with pytest.raises(TypeError, match="cannot send int as a video"):
        to_video(42)


@pytest.mark.parametrize("kind", ["png", "empty"])
def test_a_file_that_is_no_video_is_refused_before_it_is_sent_naming_it(clips, tmp_path, kind):
    path = clips["png"] if kind == "png" else tmp_path / "empty.mp4"
    path.touch()
    said = SUPPORTED if kind == "png" else "empty video data (0 bytes)"
    with pytest.raises(ValueError) as refused:
        to_video(path)
    assert f"{path} is not a video the service reads" in str(refused.value) and said in str(refused.value)
    with pytest.raises(ValueError, match=r"the video data is not a video the service reads: .*" + re.escape(said)):
        to_video(path.read_bytes())


def test_build_request_puts_images_then_videos_before_the_prompt(clips):
    request = build_request("qwen2.5-vl", "What happens?", [b"\x89PNG"],
                            videos=[to_video(clips["mp4"], fps=4), clips["webm"]], max_tokens=5)
    assert kinds(request) == ["image", "video", "video", "text"]
    parts = request.messages[0].parts
    assert (parts[1].video.fps, parts[2].video.fps) == (4, 0)
    assert parts[2].video.data == clips["webm"].read_bytes() and request.config.max_tokens == 5


# --- vlm generate --video ----------------------------------------------------------------------------


def generate(stand_in, *args):
    return cli(["--address", stand_in.address, "--api-key", "k", "generate", "--model", "qwen2.5-vl", *args])


def test_vlm_generate_sends_each_video_with_the_sampling_asked(stand_in, clips, capsys):
    assert generate(stand_in, "--image", str(clips["png"]), "--video", str(clips["mp4"]), "--video",
                    str(clips["webm"]), "--fps", "1.5", "--max-frames", "8", "What happens?") == 0
    assert capsys.readouterr().out == "a red flash\n"
    [request] = stand_in.requests
    assert kinds(request) == ["image", "video", "video", "text"]
    videos = [part.video for part in request.messages[0].parts[1:3]]
    assert [video.data for video in videos] == [clips["mp4"].read_bytes(), clips["webm"].read_bytes()]
    assert [(video.fps, video.max_frames) for video in videos] == [(1.5, 8), (1.5, 8)]
    # Unset: the service's defaults; a URL is sent for the service to fetch; streamed the same way.
    assert generate(stand_in, "--video", "https://cdn.internal/clip.mp4", "--stream", "Go") == 0
    video = stand_in.requests[-1].messages[0].parts[0].video
    assert (video.url, video.fps, video.max_frames) == ("https://cdn.internal/clip.mp4", 0, 0)
    assert capsys.readouterr().out == "a red flash\n"


def test_vlm_generate_says_what_is_wrong_with_a_video_before_sending_it(stand_in, clips, tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    cases = {
        ("--video", str(missing)): f"no such file: {missing} (--video takes",
        ("--video", str(tmp_path)): f"{tmp_path} is a directory; --video takes",
        ("--video", str(clips["png"])): f"{clips['png']} is not a video the service reads",
        ("--video", str(clips["mp4"]), "--fps", "0"): "--fps must be greater than 0",
        ("--video", str(clips["mp4"]), "--max-frames", "-3"): "--max-frames must be greater than 0",
        ("--fps", "2"): "--fps and --max-frames sample the --video clips; give a --video",
    }
    for args, said in cases.items():
        assert generate(stand_in, *args, "What happens?") == 1, args
        error = capsys.readouterr().err
        assert said in error and "Traceback" not in error, error
    assert generate(stand_in, "--video", str(clips["png"]), "x") == 1 and SUPPORTED in capsys.readouterr().err
    assert stand_in.requests == []  # none of them was sent


def test_vlm_generate_passes_a_task_with_a_video_and_shows_the_services_refusal(clips, capsys):
    refusal = "task: task ocr reads images only; use caption or vqa with a video"
    servicer = Recording(refusal=(grpc.StatusCode.INVALID_ARGUMENT, refusal))
    address, holder = serving(servicer)
    try:
        assert cli(["--address", address, "--api-key", "k", "generate", "--model", "qwen2.5-vl", "--task", "ocr",
                    "--video", str(clips["mp4"]), "Read it"]) == 1
        assert f"error: INVALID_ARGUMENT: {refusal}" in capsys.readouterr().err
        [request] = servicer.requests
        assert request.task == vlm_pb2.TASK_OCR and kinds(request) == ["video", "text"]
    finally:
        holder[0].stop(0)


# --- vlm batch ---------------------------------------------------------------------------------------


def test_a_folders_mp4_and_webm_files_are_video_items_and_its_gifs_stay_images(clips, tmp_path):
    from vlm_client.batch import folder_items

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name, kind in (("a.mp4", "mp4"), ("sub/b.WEBM", "webm"), ("c.gif", "gif"), ("d.png", "png")):
        (folder / name).write_bytes(clips[kind].read_bytes())
    (folder / "notes.txt").write_text("skipped")
    items = folder_items(folder, "Describe", "qwen2.5-vl", "caption", {"max_tokens": 8}, {"fps": 1.0})
    assert [(item.id, item.images, item.videos, item.video_options) for item in items] == [
        ("a.mp4", [], [str(folder / "a.mp4")], {"fps": 1.0}),
        ("c.gif", [str(folder / "c.gif")], [], {}),
        ("d.png", [str(folder / "d.png")], [], {}),
        ("sub/b.WEBM", [], [str(folder / "sub/b.WEBM")], {"fps": 1.0})]
    assert items[0].as_input() == {"images": [], "videos": [str(folder / "a.mp4")], "fps": 1.0, "prompt": "Describe",
                                   "model": "qwen2.5-vl", "task": "caption", "max_tokens": 8}
    assert "videos" not in items[1].as_input()


def test_manifest_lines_name_videos_and_their_sampling(tmp_path):
    from vlm_client.batch import manifest_items

    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest,
                   {"id": 1, "video": "clip.mp4", "fps": 1, "max_frames": 4},
                   {"id": 2, "videos": ["a.webm", "https://h/v.mp4"], "image": "p.png"},
                   {"id": 3, "video": "anim.gif"},  # a GIF a line names as a video is sent as one
                   {"id": 4, "video": "a.mp4", "videos": ["b.mp4"]},
                   {"id": 5, "fps": 2},
                   {"id": 6, "video": "a.mp4", "fps": "2", "max_frames": 1.5},
                   {"id": 7, "video": "a.mp4", "fps": 0, "max_frames": 0})
    first, second, third, *bad = manifest_items(manifest, "What happens?", "qwen2.5-vl", None, {}, {"max_frames": 16})
    assert (first.videos, first.images, first.video_options) == ([str(tmp_path / "clip.mp4")], [],
                                                                 {"fps": 1.0, "max_frames": 4})
    assert (second.videos, second.images, second.video_options) == (
        [str(tmp_path / "a.webm"), "https://h/v.mp4"], [str(tmp_path / "p.png")], {"max_frames": 16})
    assert third.videos == [str(tmp_path / "anim.gif")] and third.images == []
    problems = [item.problem for item in bad]
    assert all(not item.problem for item in (first, second, third))
    assert 'give "videos" or "video", not both' in problems[0]
    assert '"fps" and "max_frames" sample the line\'s videos; give "video" or "videos"' in problems[1]
    assert '"fps": Input should be a valid number' in problems[2]
    assert '"max_frames": Input should be a valid integer' in problems[2]
    assert '"fps": Input should be greater than 0' in problems[3] and '"max_frames": Input should be greater' in problems[3]
    assert all(f"m.jsonl:{line}:" in problem for line, problem in zip(range(4, 8), problems))


def test_a_batch_sends_video_items_and_a_bad_clip_is_that_items_error_line(stand_in, clips, tmp_path, capsys):
    manifest, output = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest,
                   {"id": "clip", "video": str(clips["mp4"]), "fps": 1, "max_frames": 4, "prompt": "What happens?"},
                   {"id": "photo", "image": str(clips["png"]), "prompt": "What is it?"},
                   {"id": "not-a-clip", "video": str(clips["png"]), "prompt": "What happens?"})
    assert batch(stand_in.address, manifest, output) == 2
    records = results(output)
    assert records["clip"]["text"] == "a red flash" and records["photo"]["text"] == "a red flash"
    error = records["not-a-clip"]["error"]
    assert error["code"] == "INVALID_ARGUMENT" and str(clips["png"]) in error["message"]
    assert SUPPORTED in error["message"]
    sent = {request.messages[0].parts[-1].text: request for request in stand_in.requests}
    assert set(sent) == {"What happens?", "What is it?"}  # the PNG named as a video was never sent
    video = sent["What happens?"].messages[0].parts[0].video
    assert (video.data, video.fps, video.max_frames) == (clips["mp4"].read_bytes(), 1, 4)
    assert "1 images, 1 videos in" in capsys.readouterr().err
    assert batch(stand_in.address, manifest, tmp_path / "other.jsonl", "--max-frames", "0") == 1
    assert "--max-frames must be greater than 0" in capsys.readouterr().err and len(stand_in.requests) == 2
