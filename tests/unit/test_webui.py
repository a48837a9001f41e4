"""The web UI's handlers without a browser: the conversation sent as messages, the answer streamed into
the chat, refusals leaving everything as it was, the typed results drawn (tests/integration/test_webui.py
drives the page itself in a real browser)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps
from vlm.v1 import vlm_pb2

from tests.conftest import encode, picture
from tests.unit.test_images import late_exif_png
from vlm_client.client import build_request
from vlm_client.webui.app import build
from vlm_client.webui.handlers import (FALLBACK_MODELS, Settings, Turn, WebUI, draw_boxes, label_colour,
                                       result_views, to_chat, to_messages)


class Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class Gateway:
    """The client's side of the gateway: records each call's request (built by the real client code)
    and answers with the given stream, or fails after sending `fail_after` messages."""

    address = "gateway.test:50051"

    def __init__(self, stream=(), fail: grpc.RpcError | None = None, fail_after: int = 0, models=()):
        self.answers, self.fail, self.fail_after, self.models = list(stream), fail, fail_after, models
        self.requests: list[vlm_pb2.GenerateRequest] = []

    def stream(self, model, prompt=None, images=(), **options):
        self.requests.append(build_request(model, prompt, images, **options))
        for sent, message in enumerate(self.answers):
            if self.fail is not None and sent == self.fail_after:
                raise self.fail
            yield message
        if self.fail is not None and self.fail_after >= len(self.answers):
            raise self.fail

    def list_models(self, timeout=None):
        if isinstance(self.models, grpc.RpcError):
            raise self.models
        return [vlm_pb2.ModelInfo(name=name) for name in self.models]


def deltas(*texts: str, **last_fields) -> list[vlm_pb2.GenerateStreamResponse]:
    messages = [vlm_pb2.GenerateStreamResponse(text=text, model="pixtral") for text in texts]
    messages[-1].MergeFrom(vlm_pb2.GenerateStreamResponse(finish_reason=vlm_pb2.FINISH_REASON_STOP, **last_fields))
    return messages


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(picture(80, 60, seed=1)))
    return str(path)


def ask(ui, text, files=(), turns=(), model="auto", task="none", max_tokens=64, temperature=0.0, top_p=1.0,
        detail="default"):
    return list(ui.respond({"text": text, "files": list(files)}, list(turns), model, task, max_tokens,
                           temperature, top_p, detail))


def test_the_answer_streams_into_the_chat_and_joins_the_conversation(photo):
    gateway = Gateway(deltas("A red ", "square", ".", usage=vlm_pb2.Usage(prompt_tokens=40, completion_tokens=3),
                             confidence=-0.25, model_version="1"))
    updates = ask(WebUI(gateway), "  What is it? ", [photo])
    box, chat, turns, details, gallery, table, markdown, _video = updates[-1]
    assert [update[1][-1]["content"] for update in updates[1:]] == ["A red ", "A red square", "A red square.",
                                                                 "A red square."]  # the last: with the facts
    assert updates[0][0] == {"__type__": "update", "value": None}  # the box empties as the question is sent
    assert turns == [Turn("user", "What is it?", (photo,)), Turn("assistant", "A red square.")]
    assert chat[0] == {"role": "user", "content": [{"path": photo}, "What is it?"]}
    assert "**Model** pixtral (version 1)" in details and "finish** stop" in details and "-0.250" in details
    assert "prompt 40" in details and "answer 3" in details
    assert not gallery["visible"] and not table["visible"] and not markdown["visible"]
    request = gateway.requests[0]
    assert request.model == "auto" and request.config.max_tokens == 64 and request.config.temperature == 0
    assert [part.WhichOneof("kind") for part in request.messages[0].parts] == ["image", "text"]
    assert request.messages[0].parts[0].image.data == open(photo, "rb").read()


def test_a_failed_route_attempt_is_shown_as_failed_with_its_error(photo):
    route = vlm_pb2.Route(reason=vlm_pb2.ROUTE_REASON_SPECIALIST_FAILED, attempts=[
        vlm_pb2.RouteAttempt(model="pixtral", error="Model 'pixtral' is not ready"),
        vlm_pb2.RouteAttempt(model="qwen2.5-vl", model_version="1", confidence=-0.5, completion_tokens=3)])
    details = ask(WebUI(Gateway(deltas("A chart.", route=route))), "What is it?", [photo])[-1][3]
    assert "**Route** specialist failed: pixtral (failed: Model 'pixtral' is not ready) → qwen2.5-vl (-0.500)" in details


def test_a_follow_up_sends_the_whole_conversation_and_an_empty_answer_is_left_out(photo):
    gateway = Gateway(deltas("Blue."))
    before = [Turn("user", "What is it?", (photo,)), Turn("assistant", "A square."),
              Turn("user", "Again?"), Turn("assistant", "")]
    ask(WebUI(gateway), "Which colour?", turns=before)
    sent = gateway.requests[0].messages
    assert [m.role for m in sent] == ["user", "assistant", "user", "user"]
    assert sent[1].parts[0].text == "A square." and sent[3].parts[0].text == "Which colour?"
    assert to_messages([Turn("assistant", "")]) == []


def test_settings_become_the_request_options():
    options = Settings("pixtral", task="grounding", max_tokens=100.0, temperature=0.7, top_p=0.9,
                       detail="high").request_options()
    request = build_request("pixtral", "Find it.", **options)
    assert request.task == vlm_pb2.TASK_GROUNDING and request.detail == vlm_pb2.IMAGE_DETAIL_HIGH
    assert request.config.max_tokens == 100 and request.config.top_p == pytest.approx(0.9)
    plain = build_request("pixtral", "Hi", **Settings("pixtral").request_options())
    assert plain.task == vlm_pb2.TASK_UNSPECIFIED and plain.detail == vlm_pb2.IMAGE_DETAIL_UNSPECIFIED


@pytest.mark.parametrize("fail_after", [0, 2])
def test_a_refusal_keeps_the_conversation_and_gives_the_question_back(photo, fail_after):
    earlier = [Turn("user", "Hi"), Turn("assistant", "Hello.")]
    refusal = Refusal(grpc.StatusCode.INVALID_ARGUMENT, "messages[2].parts[0].image: not an image")
    updates = ask(WebUI(Gateway(deltas("a", "b", "c"), fail=refusal, fail_after=fail_after)), "What?", [photo],
                  turns=earlier)
    box, chat, turns, details, *_ = updates[-1]
    assert turns == earlier and chat == to_chat(earlier)
    assert box["value"] == {"text": "What?", "files": [photo]}
    assert "INVALID_ARGUMENT" in details and "not an image" in details


def test_errors_say_what_to_do():
    ui = WebUI(Gateway(fail=Refusal(grpc.StatusCode.UNAUTHENTICATED, "missing API key")))
    assert "VLM_API_KEY" in ask(ui, "Hi")[-1][3]
    ui = WebUI(Gateway(fail=Refusal(grpc.StatusCode.UNAVAILABLE, "connection refused")))
    assert "gateway.test:50051" in ask(ui, "Hi")[-1][3] and "make up" in ask(ui, "Hi")[-1][3]


def test_an_unreadable_upload_is_an_error_not_a_crash(tmp_path):
    updates = ask(WebUI(Gateway(deltas("x"))), "What?", [str(tmp_path / "gone.png")])
    assert "**Error**" in updates[-1][3] and updates[-1][2] == []


def test_nothing_asked_sends_nothing():
    gateway = Gateway(deltas("x"))
    updates = ask(WebUI(gateway), "   ")
    assert gateway.requests == [] and "Type a question" in updates[-1][3]


def test_the_model_menu_comes_from_the_gateway():
    menu, note = WebUI(Gateway(models=("auto", "pixtral", "qwen2.5-vl"))).models()
    assert menu["choices"] == ["auto", "pixtral", "qwen2.5-vl"] and menu["value"] == "auto" and note == ""
    menu, note = WebUI(Gateway(models=Refusal(grpc.StatusCode.UNAVAILABLE, "down"))).models()
    assert menu["choices"] == list(FALLBACK_MODELS) and "UNAVAILABLE" in note


def stored_photo(orientation: int, kind: str) -> bytes:
    """A photo stored 120x80 with a blue block at OBJECT of that stored grid, shown turned by its
    EXIF orientation: a JPEG (as phones write them), or a PNG whose eXIf follows its pixels."""
    pixels = np.full((80, 120, 3), 255, dtype=np.uint8)
    x1, y1, x2, y2 = OBJECT
    pixels[y1:y2, x1:x2] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    if kind == "jpeg":
        return encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    return late_exif_png(encode(Image.fromarray(pixels)), orientation)


OBJECT = (10, 5, 45, 30)


def extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("kind, orientation", [*(("jpeg", o) for o in range(1, 9)), ("late-exif png", 6)])
def test_a_box_is_drawn_around_its_object_on_the_upright_picture(tmp_path, kind, orientation):
    """The service's box is in the file's stored grid (around OBJECT, whatever the orientation);
    the picture is shown upright, and the box is drawn where the object is on it."""
    path = tmp_path / "photo"
    path.write_bytes(stored_photo(orientation, kind))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")).astype(int)
    blue = (upright[:, :, 2] > 160) & (upright[:, :, 0] < 100)
    box = vlm_pb2.Box(x_min=OBJECT[0], y_min=OBJECT[1], x_max=OBJECT[2], y_max=OBJECT[3])
    [(drawn, caption)] = draw_boxes([str(path)], [(0, box, "")])
    assert drawn.size == (upright.shape[1], upright.shape[0]) and caption == "image 1: 1 box"
    outline = np.abs(np.asarray(drawn).astype(int) - np.array(label_colour(""))).max(axis=2) < 60
    assert np.allclose(extent(outline), extent(blue), atol=2), (extent(outline), extent(blue))


def test_boxes_outside_the_image_are_said_not_silently_missing(photo):
    found = vlm_pb2.GenerateStreamResponse(detections=vlm_pb2.Detections(detections=[
        vlm_pb2.Detection(label="car", box=vlm_pb2.Box(x_min=1, y_min=1, x_max=20, y_max=20))], boxes_outside=2))
    gallery, _, markdown = result_views(found, [photo])
    assert gallery["visible"] and markdown == {"__type__": "update", "value": "*2 boxes outside the image, not drawn*",
                                               "visible": True}
    none_inside = vlm_pb2.GenerateStreamResponse(detections=vlm_pb2.Detections(boxes_outside=1))
    gallery, _, markdown = result_views(none_inside, [photo])
    assert not gallery["visible"] and markdown["value"] == "*1 box outside the image, not drawn*"
    lines = vlm_pb2.GenerateStreamResponse(text_lines=vlm_pb2.TextLines(lines=[vlm_pb2.TextLine(text="EXIT")],
                                                                        boxes_outside=1))
    assert result_views(lines, [photo])[2]["value"] == "- EXIT\n\n*1 box outside the image, not drawn*"
    whole = vlm_pb2.GenerateStreamResponse(detections=vlm_pb2.Detections(detections=found.detections.detections))
    assert not result_views(whole, [photo])[2]["visible"]


def test_each_result_type_shows_its_panel(photo, tmp_path):
    other = tmp_path / "other.png"
    other.write_bytes(encode(picture(50, 50, seed=2)))
    detections = vlm_pb2.GenerateStreamResponse(detections=vlm_pb2.Detections(detections=[
        vlm_pb2.Detection(label="car", box=vlm_pb2.Box(x_min=1, y_min=1, x_max=20, y_max=20), image_index=1),
        vlm_pb2.Detection(label="dog", box=vlm_pb2.Box(x_min=5, y_min=5, x_max=30, y_max=30), image_index=1)]))
    gallery, table, markdown = result_views(detections, [photo, str(other)])
    [(image, caption)] = gallery["value"]
    assert gallery["visible"] and caption == "image 2: 2 boxes" and image.size == (50, 50)
    assert not table["visible"] and not markdown["visible"]

    chart = vlm_pb2.GenerateStreamResponse(table=vlm_pb2.Table(header=["year", "sales"], rows=[
        vlm_pb2.Table.Row(cells=["2024", "3", "extra"]), vlm_pb2.Table.Row(cells=["2025"])]))
    gallery, table, markdown = result_views(chart, [photo])
    assert table["visible"] and table["value"] == {"headers": ["year", "sales"], "data": [["2024", "3"], ["2025", ""]]}
    assert not gallery["visible"]

    page = vlm_pb2.GenerateStreamResponse(document=vlm_pb2.Document(markdown="# Title\n\n| a |\n|---|\n| 1 |"))
    assert result_views(page, [photo])[2] == {"__type__": "update", "value": "# Title\n\n| a |\n|---|\n| 1 |",
                                              "visible": True}
    lines = vlm_pb2.GenerateStreamResponse(text_lines=vlm_pb2.TextLines(lines=[
        vlm_pb2.TextLine(text="EXIT", box=vlm_pb2.Box(x_min=2, y_min=2, x_max=40, y_max=12)),
        vlm_pb2.TextLine(text="no box here")]))
    gallery, _, markdown = result_views(lines, [photo])
    assert gallery["value"][0][1] == "image 1: 1 box" and markdown["value"] == "- EXIT\n- no box here"


def test_a_new_conversation_forgets_everything():
    box, chat, turns, details, gallery, table, markdown, video = WebUI(Gateway()).clear()
    assert chat == [] and turns == [] and details == "" and not gallery["visible"] and video["value"] is None


def test_the_page_never_holds_the_api_key(monkeypatch):
    monkeypatch.setenv("VLM_API_KEY", "secret-key-123")
    from vlm_client.client import VLMClient

    with VLMClient("localhost:1") as client:
        page = build(WebUI(client))
        assert "secret-key-123" not in str(page.get_config_file())


@pytest.mark.timeout(120)
def test_an_unreachable_gateway_is_an_error_within_seconds(monkeypatch):
    """The UI's own client (as `main` builds it), with nothing listening at its address."""
    import time

    from tests.integration.conftest import free_ports
    from vlm_client.webui import app

    built = []

    class Page:
        def queue(self, **_):
            pass

        def launch(self, **_):
            pass

    monkeypatch.setattr(app, "build", lambda ui: built.append(ui) or Page())
    [port] = free_ports(1)
    assert app.main(["--address", f"127.0.0.1:{port}"]) == 0
    [ui] = built
    started = time.monotonic()
    *_, (box, chat, turns, details, *_results) = ask(ui, "Anyone there?")
    assert time.monotonic() - started < 15
    assert f"Is the gateway at 127.0.0.1:{port} running?" in details and turns == []
    started = time.monotonic()
    menu, note = ui.models()
    assert time.monotonic() - started < 15 and f"127.0.0.1:{port}" in note
