"""The web UI's video upload (issue 27, item 4) without a browser: the frames it previews are the
service's sampling of the clip (vlm_serving.preprocessing.video.decode_video at the chosen fps and
max_frames), the question is sent with the clip and those two numbers, and it stays in the conversation."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from vlm.v1 import vlm_pb2

from tests.unit.test_video import encode, gif
from tests.unit.test_webui import Gateway, Refusal, deltas
from vlm_client.webui.app import build
from vlm_client.webui.handlers import Clip, Turn, WebUI, sampled_frames, to_chat, to_messages
from vlm_serving.preprocessing.video import decode_video


@pytest.fixture
def clip(tmp_path):
    """A 5-second MP4 at 10 fps, each frame a different grey."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode("h264", frames=50, rate=10))
    return str(path)


def ask(ui, text, files=(), turns=(), video=None, fps=2.0, max_frames=32, task="none"):
    return list(ui.respond({"text": text, "files": list(files)}, list(turns), "auto", task, 64, 0.0, 1.0,
                           "default", video, fps, max_frames))


@pytest.mark.parametrize(("fps", "max_frames", "count"), [(2.0, 32, 10), (1.0, 32, 5), (2.0, 4, 4), (30.0, 256, 50)])
def test_the_preview_shows_the_frames_the_service_samples(clip, fps, max_frames, count):
    gallery, note = sampled_frames(clip, fps, max_frames)
    service = decode_video(open(clip, "rb").read(), fps=fps, max_frames=max_frames)
    assert gallery["visible"] and len(gallery["value"]) == len(service.frames) == count
    for (frame, caption), expected, seconds in zip(gallery["value"], service.frames, service.timestamps_s):
        assert np.array_equal(np.asarray(frame), np.asarray(expected))
        assert caption == f"{seconds:.2f} s"
    assert f"**{count} frames**" in note["value"] and f"{service.sampling_fps:g} fps" in note["value"]
    assert "5.0 s" in note["value"] and "64×48" in note["value"]


def test_an_animated_gif_is_previewed_as_a_clip(tmp_path):
    path = tmp_path / "anim.gif"
    path.write_bytes(gif([(255, 0, 0), (0, 0, 255), (0, 255, 0)], [500, 500, 500]))
    gallery, note = sampled_frames(str(path), 2.0, 32)
    assert [tuple(np.asarray(frame)[0, 0]) for frame, _ in gallery["value"]] == [(255, 0, 0), (0, 0, 255),
                                                                                 (0, 255, 0)]


def test_a_file_that_is_no_video_is_said_in_place_of_the_preview(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a clip")
    gallery, note = sampled_frames(str(path), 2.0, 32)
    assert not gallery["visible"] and "not a supported video file" in note["value"] and "MP4 (H.264)" in note["value"]
    gallery, note = sampled_frames(None, 2.0, 32)  # the upload removed
    assert not gallery["visible"] and note["value"] == ""


def test_the_question_is_sent_with_the_clip_and_its_sampling_and_joins_the_conversation(clip):
    gateway = Gateway(deltas("It gets lighter."))
    updates = ask(WebUI(gateway), "What happens?", video=clip, fps=1.0, max_frames=8)
    *_, turns, details, _gallery, _table, _markdown, video = updates[-1]
    assert updates[0][-1] == {"__type__": "update", "value": None}  # the upload empties as the clip is sent
    [request] = gateway.requests
    assert [part.WhichOneof("kind") for part in request.messages[0].parts] == ["video", "text"]
    sent = request.messages[0].parts[0].video
    assert (sent.data, sent.fps, sent.max_frames) == (open(clip, "rb").read(), 1.0, 8)
    assert turns[0] == Turn("user", "What happens?", videos=(Clip(clip, 1.0, 8),))
    assert to_chat(turns)[0] == {"role": "user", "content": [{"path": clip}, "What happens?"]}
    # A follow-up sends the clip again with the conversation, as images are.
    follow_up = Gateway(deltas("Grey."))
    ask(WebUI(follow_up), "Which colour?", turns=turns)
    first, _answer, second = follow_up.requests[0].messages
    assert first.parts[0].video == sent and [p.WhichOneof("kind") for p in second.parts] == ["text"]


def test_images_and_a_clip_go_in_one_turn_images_first(clip, tmp_path):
    from tests.conftest import encode as encode_image
    from tests.conftest import picture

    photo = tmp_path / "photo.png"
    photo.write_bytes(encode_image(picture(30, 20)))
    [message] = to_messages([Turn("user", "Same scene?", (str(photo),), (Clip(clip, 2.0, 32),))])
    assert [part.WhichOneof("kind") for part in message.parts] == ["image", "video", "text"]


def test_a_refused_clip_is_given_back_with_the_question(clip):
    refusal = Refusal(grpc.StatusCode.INVALID_ARGUMENT, "task: task ocr reads images only; use caption or vqa")
    updates = ask(WebUI(Gateway(deltas("x"), fail=refusal)), "Read it", video=clip, task="ocr")
    box, chat, turns, details, *_results, video = updates[-1]
    assert turns == [] and box["value"] == {"text": "Read it", "files": []} and video["value"] == clip
    assert "INVALID_ARGUMENT" in details and "reads images only" in details


def test_a_clip_alone_is_a_question_and_a_file_that_is_no_video_is_an_error(tmp_path, clip):
    gateway = Gateway(deltas("Frames."))
    assert ask(WebUI(gateway), "", video=clip)[-1][2][-1] == Turn("assistant", "Frames.")
    assert "Type a question or add an image or a video" in ask(WebUI(gateway), "  ")[-1][3]
    notes = tmp_path / "notes.webm"
    notes.write_text("not a clip")
    *_, turns, details, _gallery, _table, _markdown, video = ask(WebUI(gateway), "What?", video=str(notes))[-1]
    assert "**Error**" in details and "not a video the service reads" in details and turns == []
    assert video["value"] == str(notes) and len(gateway.requests) == 1


def test_the_page_has_a_video_upload_with_its_sampling_controls():
    from vlm_client.client import VLMClient

    with VLMClient("localhost:1") as client:
        config = build(WebUI(client)).get_config_file()
    by_id = {component["props"].get("elem_id"): component for component in config["components"]}
    assert by_id["video"]["type"] == "file" and by_id["video"]["props"]["file_types"] == [".mp4", ".webm", ".gif"]
    assert by_id["fps"]["props"]["value"] == 2 and by_id["max-frames"]["props"]["value"] == 32
    assert (by_id["fps"]["props"]["minimum"], by_id["fps"]["props"]["maximum"]) == (0.1, 30)
    assert (by_id["max-frames"]["props"]["minimum"], by_id["max-frames"]["props"]["maximum"]) == (2, 256)
    assert by_id["frames"]["type"] == "gallery"
