"""The web UI's handlers: the conversation kept as turns, each question sent with the whole
conversation through the Python client, the answer streamed into the page, the typed result drawn,
and an uploaded video's frames shown as the service samples them before the clip is sent.

Everything here is plain Python over the client and Gradio's update values, so it is tested without
a browser (tests/unit/test_webui.py); `app.py` only lays the page out and wires these to it."""

from __future__ import annotations

import colorsys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr
import grpc
from PIL import ExifTags, Image, ImageDraw, ImageOps
from vlm.v1 import vlm_pb2

from vlm_client.client import VLMClient
from vlm_client.images import to_image, upright_box
from vlm_client.videos import to_video

# Shown when the gateway cannot be asked which models it serves; ListModels names these by default.
FALLBACK_MODELS = ("auto", "qwen2.5-vl", "pixtral")
# (label, value) pairs of the task menu; "none" is free chat.
TASKS = (("Chat (free text)", "none"), ("Caption", "caption"), ("Question answering", "vqa"),
         ("Read text (OCR, with boxes)", "ocr"), ("Document to Markdown", "document"),
         ("Find objects (grounding, with boxes)", "grounding"), ("Chart to table", "chart"))
DETAILS = (("Model's default", "default"), ("Auto (by image kind)", "auto"), ("Low", "low"), ("High", "high"))


@dataclass(frozen=True)
class Clip:
    """A video of the conversation (the path of Gradio's upload) and the sampling it is sent with."""

    path: str
    fps: float
    max_frames: int


@dataclass(frozen=True)
class Turn:
    """One turn of the conversation: a user's question with the images and videos they added (paths
    of Gradio's uploads), or the model's answer."""

    role: str
    text: str
    images: tuple[str, ...] = ()
    videos: tuple[Clip, ...] = ()


@dataclass(frozen=True)
class Settings:
    """The page's controls, as one request's options."""

    model: str
    task: str = "none"
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    detail: str = "default"

    def request_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_tokens": int(self.max_tokens), "temperature": float(self.temperature),
                                   "top_p": float(self.top_p)}
        if self.task != "none":
            options["task"] = self.task
        if self.detail != "default":
            options["detail"] = self.detail
        return options


def to_messages(turns: Sequence[Turn]) -> list[vlm_pb2.Message]:
    """The conversation as the API's messages: each user turn's images, then its videos, before its
    text (an empty answer, which the API could not take as a message, is left out)."""
    messages = []
    for turn in turns:
        parts = [vlm_pb2.Part(image=to_image(path)) for path in turn.images]
        parts += [vlm_pb2.Part(video=to_video(clip.path, clip.fps, clip.max_frames)) for clip in turn.videos]
        if turn.text:
            parts.append(vlm_pb2.Part(text=turn.text))
        if parts:
            messages.append(vlm_pb2.Message(role=turn.role, parts=parts))
    return messages


def to_chat(turns: Sequence[Turn]) -> list[dict]:
    """The conversation as Gradio Chatbot messages (images and videos shown in the user's bubble)."""
    chat = []
    for turn in turns:
        content: list[Any] = [{"path": path} for path in (*turn.images, *(clip.path for clip in turn.videos))]
        if turn.text:
            content.append(turn.text)
        chat.append({"role": turn.role, "content": content if turn.images or turn.videos else turn.text})
    return chat


def conversation_images(turns: Sequence[Turn]) -> list[str]:
    """The request's images in message order: a result's image_index counts in this list."""
    return [path for turn in turns for path in turn.images]


def describe(last: vlm_pb2.GenerateStreamResponse) -> str:
    """The answer's facts in Markdown: model and version, why it answered, confidence, tokens."""
    finish = vlm_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    lines = [f"**Model** {last.model} (version {last.model_version or '?'}) · **finish** {finish} · "
             f"**confidence** {last.confidence:.3f} (mean log-probability per token)",
             f"**Tokens** prompt {last.usage.prompt_tokens} (images {last.usage.image_tokens}) · "
             f"answer {last.usage.completion_tokens}"]
    if last.route.reason not in (vlm_pb2.ROUTE_REASON_UNSPECIFIED, vlm_pb2.ROUTE_REASON_REQUESTED):
        reason = vlm_pb2.RouteReason.Name(last.route.reason).removeprefix("ROUTE_REASON_").lower().replace("_", " ")
        # An attempt with an error gave no answer (model auto kept another): its confidence means nothing.
        attempts = " → ".join(f"{a.model} (failed: {textwrap.shorten(a.error, 160, placeholder='…')})" if a.error
                              else f"{a.model} ({a.confidence:.3f})" for a in last.route.attempts)
        lines.append(f"**Route** {reason}: {attempts}")
    if last.route.images:
        kinds = ", ".join(f"{vlm_pb2.ImageKind.Name(image.kind).removeprefix('IMAGE_KIND_').lower()} "
                          f"at {image.width}×{image.height}" for image in last.route.images)
        lines.append(f"**Images** {kinds}")
    if last.result_error:
        lines.append(f"**No typed result**: {last.result_error}")
    return "\n\n".join(lines)


def label_colour(label: str) -> tuple[int, int, int]:
    """A stable, distinct colour per label (the same label is the same colour in every image)."""
    hue = (sum(label.encode()) * 0.618033988749895) % 1.0
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))


def draw_boxes(images: Sequence[str], boxes: Sequence[tuple[int, vlm_pb2.Box, str]]) -> list[tuple[Image.Image, str]]:
    """Each image that has boxes, upright (EXIF orientation applied, as the browser shows the
    uploads), with its boxes (the service's: pixels of the file as stored) turned onto it and their
    labels drawn: (image, caption) pairs for a Gallery."""
    drawn = []
    for index, path in enumerate(images):
        mine = [(box, label) for image_index, box, label in boxes if image_index == index]
        if not mine:
            continue
        with Image.open(path) as source:
            picture = ImageOps.exif_transpose(source).convert("RGB")  # loads the file: a late PNG eXIf too
            orientation = source.getexif().get(ExifTags.Base.Orientation, 1)
            stored_size = source.size
        pen = ImageDraw.Draw(picture)
        width = max(2, round(min(picture.size) / 150))
        for box, label in mine:
            colour = label_colour(label)
            left, top, right, bottom = upright_box(box, stored_size, orientation)
            pen.rectangle((left, top, right, bottom), outline=colour, width=width)
            if label:
                text_box = pen.textbbox((left, top), label)
                pen.rectangle((text_box[0] - 1, text_box[1] - 1, text_box[2] + 1, text_box[3] + 1), fill=colour)
                pen.text((left, top), label, fill=(0, 0, 0))
        drawn.append((picture, f"image {index + 1}: {len(mine)} box{'es' if len(mine) != 1 else ''}"))
    return drawn


def outside_note(count: int) -> str | None:
    """What the page says of the boxes the service dropped (none of their area inside the image)."""
    if not count:
        return None
    return f"*{count} box{'es' if count != 1 else ''} outside the image, not drawn*"


def result_views(last: vlm_pb2.GenerateStreamResponse | None, images: Sequence[str]) -> tuple[dict, dict, dict]:
    """Updates of the three result panels (boxes gallery, table, Markdown) for a finished answer:
    the panel of its result type shown, the others hidden."""
    kind = last.WhichOneof("result") if last is not None else None
    result = getattr(last, kind) if kind else None
    gallery = table = markdown = None
    if kind == "detections":
        gallery = draw_boxes(images, [(d.image_index, d.box, d.label) for d in result.detections])
        markdown = outside_note(result.boxes_outside)
    elif kind == "text_lines":
        gallery = draw_boxes(images, [(line.image_index, line.box, line.text) for line in result.lines
                                      if line.HasField("box")])
        markdown = "\n".join([f"- {line.text}" for line in result.lines]
                             + ([f"\n{outside_note(result.boxes_outside)}"] if result.boxes_outside else []))
    elif kind == "table":
        width = len(result.header)
        rows = [list(row.cells)[:width] + [""] * (width - len(row.cells)) for row in result.rows]
        table = {"headers": list(result.header), "data": rows or [[""] * width]}
    elif kind == "document":
        markdown = result.markdown
    elif kind == "caption":
        markdown = f"*{result.text}*"
    return (gr.update(value=gallery, visible=bool(gallery)), gr.update(value=table, visible=table is not None),
            gr.update(value=markdown or "", visible=markdown is not None))


def hidden_results() -> tuple[dict, dict, dict]:
    return result_views(None, ())


def sampled_frames(video: str | None, fps: float, max_frames: int) -> tuple[dict, dict]:
    """Updates of the frames gallery and its note for the uploaded `video`: the frames the service
    takes of it at `fps` and `max_frames` (its own sampling, vlm_serving.preprocessing.video, with
    the default limits), each captioned with its time; or, for a file it would refuse, why."""
    if not video:
        return gr.update(value=None, visible=False), gr.update(value="")
    from vlm_serving.preprocessing.video import VideoError, decode_video

    try:
        with open(video, "rb") as file:
            sampled = decode_video(file.read(), fps=float(fps), max_frames=int(max_frames))
    except (OSError, VideoError) as error:
        return gr.update(value=None, visible=False), gr.update(value=f"**Video** {error}")
    info = sampled.info
    note = (f"**{len(sampled.frames)} frames** at {sampled.sampling_fps:g} fps of {info.duration_s:.1f} s, "
            f"{sampled.frames[0].width}×{sampled.frames[0].height} ({info.container}): what the model is sent")
    frames = [(frame, f"{seconds:.2f} s") for frame, seconds in zip(sampled.frames, sampled.timestamps_s)]
    return gr.update(value=frames, visible=True), gr.update(value=note)


def error_text(error: grpc.RpcError, address: str) -> str:
    """A gRPC error as the page says it, with what to do where the status alone does not say."""
    code = error.code()
    text = f"**Error** {code.name}: {error.details()}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        text += "\n\nStart the UI with `VLM_API_KEY` set to a key the gateway accepts."
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        text += f"\n\nIs the gateway at {address} running? (`make up` starts the local stack.)"
    return text


class WebUI:
    """The handlers of one UI process, over one client (its API key from VLM_API_KEY, never sent
    to the page)."""

    def __init__(self, client: VLMClient):
        self.client = client

    def models(self) -> tuple[dict, str]:
        """The model menu from the gateway's ListModels (with a note when it cannot be reached)."""
        try:
            names = [model.name for model in self.client.list_models(timeout=5)]
            note = ""
        except grpc.RpcError as error:
            names, note = list(FALLBACK_MODELS), error_text(error, self.client.address)
        default = "auto" if "auto" in names else (names[0] if names else None)
        return gr.update(choices=names, value=default), note

    def respond(self, message: dict | None, turns: list[Turn], model: str, task: str, max_tokens: float,
                temperature: float, top_p: float, detail: str, video: str | None = None, fps: float = 2.0,
                max_frames: float = 32) -> Iterator[tuple]:
        """Ask the question in `message` ({"text", "files"} of the multimodal box), with the uploaded
        `video` sampled at `fps` and `max_frames`, after `turns`. Yields (box, chat, turns, details,
        gallery, table, markdown, video upload) as the answer streams in. A refused or failed request
        leaves the conversation as it was and the question and the video where they were."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = tuple(message.get("files") or ())
        clips = (Clip(video, float(fps), int(max_frames)),) if video else ()
        if not text and not files and not clips:
            yield (gr.update(), to_chat(turns), turns, "Type a question or add an image or a video.",
                   *hidden_results(), gr.update())
            return
        asked = [*turns, Turn("user", text, files, clips)]
        settings = Settings(model, task, max_tokens, temperature, top_p, detail)
        text_so_far, last = "", None
        yield (gr.update(value=None), to_chat(asked), turns, "*Thinking…*", *hidden_results(), gr.update(value=None))
        try:
            for chunk in self.client.stream(model, messages=to_messages(asked), **settings.request_options()):
                text_so_far, last = text_so_far + chunk.text, chunk
                # The answer so far is part of the conversation: a stopped answer stays as shown.
                now = [*asked, Turn("assistant", text_so_far)]
                yield (gr.update(), to_chat(now), now, "*Answering…*", *hidden_results(), gr.update())
        except grpc.RpcError as error:
            yield (*self._given_back(text, files, turns), error_text(error, self.client.address),
                   *hidden_results(), gr.update(value=video))
            return
        except (OSError, ValueError) as error:  # an uploaded file that cannot be read, or is no video
            yield (*self._given_back(text, files, turns), f"**Error** {error}", *hidden_results(),
                   gr.update(value=video))
            return
        done = [*asked, Turn("assistant", text_so_far)]
        yield (gr.update(), to_chat(done), done, describe(last), *result_views(last, conversation_images(done)),
               gr.update())

    @staticmethod
    def _given_back(text: str, files: tuple[str, ...], turns: list[Turn]) -> tuple:
        """The box with the question again, and the conversation as it was."""
        return gr.update(value={"text": text, "files": list(files)}), to_chat(turns), turns

    def clear(self) -> tuple:
        """A new conversation."""
        return (gr.update(value=None), [], [], "", *hidden_results(), gr.update(value=None))
