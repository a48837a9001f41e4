"""Tasks: what the model is asked (per family), the shape its answer must take, and the typed result.

Light (no model code): the preprocessing step puts a task's instruction into the prompt
(`apply_task`, it knows the family), the gateway sets the task's response format before the
request leaves it (`output_format`) and parses the final text into a typed result (`parse`).

Boxes: Qwen2.5-VL answers in absolute pixels of the image as the model saw it (its documented
`bbox_2d` grounding format); Pixtral has no documented convention and is asked for the same JSON on
a 0-1000 scale of the image's width and height. `parse` maps every box back to the pixels of the
image as it was sent: through the resize preprocessing applied and through its EXIF orientation
(the file's stored pixel grid, what an image library shows before applying the orientation),
clamped to the image; a box with no area inside the image is dropped and counted.

An answer that max_tokens cut (finish reason LENGTH) has no result, whatever the task: a part would
pass for the whole (a caption mid-sentence, OCR without its last lines). Each task has its own
default max_tokens (`DEFAULT_MAX_TOKENS`), sized so that its answers are rarely cut.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from vlm_serving.generation.structured import JSON_SCHEMA, ResponseFormat

CAPTION, VQA, OCR, DOCUMENT, GROUNDING, CHART = "caption", "vqa", "ocr", "document", "grounding", "chart"
TASKS = (CAPTION, VQA, OCR, DOCUMENT, GROUNDING, CHART)
# Tasks whose prompts suit a video clip; the others (boxes, text lines, pages, charts) read images only.
VIDEO_TASKS = (CAPTION, VQA)
# Tasks whose answer is a JSON document (constrained by `output_format`); the rest answer in text.
STRUCTURED = (OCR, GROUNDING, CHART)
# How each family states box coordinates: pixels of the image it saw, or per mille of its sides.
BOX_UNITS = {"qwen2_5_vl": "pixels", "pixtral": "per_mille"}
MAX_COORDINATE = 16384
# max_tokens for a task's request that leaves it unset, sized from the answers: a caption or a
# short answer takes tens of tokens; a grounding item (box and label) about 20, so ~50 objects fit
# in 1,024; an OCR line (box and text) about 15 plus its text, so a dense page's 60 to 80 lines fit
# in 2,048; a page as Markdown 1,000 to 2,000; a chart's table about 5 per cell, ~200 cells in
# 1,024. At most half of a 4,096-token context (the tiny checkpoints'), so prompts of up to 2,048
# tokens still fit beside them.
DEFAULT_MAX_TOKENS = {CAPTION: 256, VQA: 256, OCR: 2048, DOCUMENT: 2048, GROUNDING: 1024, CHART: 1024}


class TaskError(ValueError):
    """A task that cannot be asked as given (the message says what to fix)."""


class ParseError(ValueError):
    """An answer that holds no result of its task (the message says what was found instead)."""


class CutAnswer(ParseError):
    """An answer max_tokens ended before it was whole: it holds no result (the message says so)."""


# ----- results -----

@dataclass(frozen=True)
class Box:
    """Pixels of the image as it was sent: left, top, right, bottom."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass
class Detection:
    label: str
    box: Box
    image: int = 0  # index of the request's image (0-based)


@dataclass
class TextLine:
    text: str
    box: Box | None = None
    image: int = 0


@dataclass
class Detections:
    detections: list[Detection] = field(default_factory=list)
    # Boxes with no area inside their image: their detections are dropped.
    boxes_outside: int = 0


@dataclass
class TextLines:
    lines: list[TextLine] = field(default_factory=list)
    # Boxes with no area inside their image: their lines keep no box.
    boxes_outside: int = 0


@dataclass
class Document:
    markdown: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Caption:
    text: str


@dataclass(frozen=True)
class ImageGeometry:
    """How one image went from the file to the model: its stored size and EXIF orientation, and
    the (upright) size preprocessing resized it to."""

    stored_width: int
    stored_height: int
    orientation: int  # EXIF 1-8 (1: as stored)
    served_width: int
    served_height: int


# ----- prompts -----

def _images_clause(image_count: int) -> str:
    if image_count <= 1:
        return ""
    return (f" There are {image_count} images; give each item's image number (1 to {image_count}) "
            'as "image".')


def _box_clause(family: str) -> str:
    if BOX_UNITS[family] == "pixels":
        return ""
    return " Coordinates are on a 0-1000 scale of the image's width and height."


def _caption_subject(image_count: int, video_count: int) -> str:
    if not video_count:
        return "each image" if image_count > 1 else "this image"
    if not image_count:
        return "each video" if video_count > 1 else "this video"
    return "each image and video"


def instruction(task: str, family: str, user_text: str, image_count: int, video_count: int = 0) -> str:
    """The text the model gets for `task` in the family's own conventions (`user_text`: what the
    caller wrote, kept where the task uses it)."""
    if video_count and task not in VIDEO_TASKS:
        raise TaskError(f"task {task} reads images only (tasks for videos: {', '.join(VIDEO_TASKS)}); send the "
                        "clip's frames as images, or ask without the task")
    user_text = user_text.strip()
    many = _images_clause(image_count)
    boxes = _box_clause(family)
    if task == CAPTION:
        subject = _caption_subject(image_count, video_count)
        return (f"Describe {subject} in one or two sentences." + (f" {user_text}" if user_text else "")).strip()
    if task == VQA:
        if not user_text:
            raise TaskError("task vqa needs a question in the message text")
        return f"{user_text}\nAnswer the question briefly."
    if task == OCR:
        if BOX_UNITS[family] == "pixels":  # Qwen2.5-VL's documented text spotting prompt
            return "Spotting all the text in the image with line-level, and output in JSON format." + many
        return ('Read all the text in the image line by line. Output a JSON array with one object per line: '
                '{"text_content": the line\'s text, "bbox_2d": [x1, y1, x2, y2]}.' + boxes + many)
    if task == DOCUMENT:
        return "Convert the document page to Markdown. Write tables as Markdown tables." + (
            f" {user_text}" if user_text else "")
    if task == GROUNDING:
        target = f"every {user_text}" if user_text else "all salient objects"
        if BOX_UNITS[family] == "pixels":  # Qwen2.5-VL's documented grounding prompt
            return f"Locate {target} in the image, and output the bbox coordinates in JSON format." + many
        return (f'Locate {target} in the image. Output a JSON array with one object per object found: '
                '{"label": its name, "bbox_2d": [x1, y1, x2, y2]}.' + boxes + many)
    if task == CHART:
        return ('Convert the chart into a data table. Output JSON: {"header": [column names], '
                '"rows": [[cell, ...], ...]}.' + (f" {user_text}" if user_text else ""))
    raise TaskError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def apply_task(messages: list[dict], task: str, family: str) -> list[dict]:
    """The messages with the last user turn's text replaced by the task's instruction (its images
    stay where they are)."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        user_text = " ".join(part.get("text", "") for part in parts if part.get("type") == "text")
        media = [p.get("type") for m in messages for p in (m["content"] if isinstance(m["content"], list) else [])]
        kept = [part for part in parts if part.get("type") != "text"]
        text = instruction(task, family, user_text, media.count("image"), media.count("video"))
        return [*messages[: messages.index(message)], {**message, "content": kept + [{"type": "text", "text": text}]},
                *messages[messages.index(message) + 1 :]]
    raise TaskError(f"task {task} needs a user message")


# ----- output formats -----

def _box_schema() -> dict:
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": MAX_COORDINATE},
            "minItems": 4, "maxItems": 4}


def _with_image(properties: dict, required: list[str], image_count: int) -> dict:
    if image_count > 1:
        properties = {**properties, "image": {"type": "integer", "minimum": 1, "maximum": image_count}}
        required = [*required, "image"]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def output_schema(task: str, image_count: int) -> dict | None:
    """The JSON Schema a task's answer takes (None: free text). Properties are generated in the
    order given: Qwen2.5-VL's own (box first)."""
    if task == GROUNDING:
        item = _with_image({"bbox_2d": _box_schema(), "label": {"type": "string", "minLength": 1, "maxLength": 64}},
                           ["bbox_2d", "label"], image_count)
        return {"type": "array", "items": item, "maxItems": 64}
    if task == OCR:
        item = _with_image({"bbox_2d": _box_schema(), "text_content": {"type": "string", "maxLength": 512}},
                           ["bbox_2d", "text_content"], image_count)
        return {"type": "array", "items": item, "maxItems": 256}
    if task == CHART:
        cell = {"type": "string", "maxLength": 64}
        return {"type": "object", "properties": {
            "header": {"type": "array", "items": cell, "minItems": 1, "maxItems": 32},
            "rows": {"type": "array", "items": {"type": "array", "items": cell, "maxItems": 32}, "maxItems": 256}},
            "required": ["header", "rows"], "additionalProperties": False}
    return None


def output_format(task: str, image_count: int) -> ResponseFormat:
    schema = output_schema(task, image_count)
    if schema is None:
        return ResponseFormat()
    return ResponseFormat(JSON_SCHEMA, schema=json.dumps(schema, separators=(",", ":")))


# ----- parsing -----

_FENCE = re.compile(r"```[a-zA-Z]*\n?(.*?)```", re.S)


def find_json(text: str):
    """The JSON object or array the answer holds: in its first code fence, or the value that its
    first `[` or `{` opens (prose around it is left). A value that does not close is an error, never
    a whole item found inside it: that would drop every item after it without a word."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start = next((i for i, char in enumerate(body) if char in "[{"), None)
    if start is None:
        raise ParseError(f"no JSON object or array in the answer ({_preview(text)})")
    try:
        value, _ = json.JSONDecoder().raw_decode(body, start)
    except json.JSONDecodeError as exc:
        raise ParseError(f"its JSON is not whole ({exc.msg} at character {exc.pos} of {len(body)}): "
                         f"{_preview(body[start:])}") from None
    return value


def _preview(text: str) -> str:
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def to_original(coordinates: list[float], family: str, geometry: ImageGeometry) -> Box | None:
    """A box the model gave (its units, the image as it saw it) in pixels of the image as sent,
    clamped to the image; None when no area of it lies inside the image."""
    x1, y1, x2, y2 = (float(value) for value in coordinates)
    quarter = geometry.orientation in (5, 6, 7, 8)
    upright_w, upright_h = ((geometry.stored_height, geometry.stored_width) if quarter
                            else (geometry.stored_width, geometry.stored_height))
    if BOX_UNITS[family] == "pixels":
        scale_x, scale_y = upright_w / geometry.served_width, upright_h / geometry.served_height
    else:
        scale_x, scale_y = upright_w / 1000, upright_h / 1000
    xs = [min(max(x * scale_x, 0.0), upright_w) for x in (x1, x2)]
    ys = [min(max(y * scale_y, 0.0), upright_h) for y in (y1, y2)]
    if xs[0] == xs[1] or ys[0] == ys[1]:
        return None
    corners = [_stored_point(x, y, geometry) for x in xs for y in ys]
    return Box(min(c[0] for c in corners), min(c[1] for c in corners),
               max(c[0] for c in corners), max(c[1] for c in corners))


def _stored_point(x: float, y: float, geometry: ImageGeometry) -> tuple[float, float]:
    """A point of the upright image in the stored grid: the inverse of PIL's `exif_transpose`."""
    w, h = geometry.stored_width, geometry.stored_height
    return {
        1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y),
        5: (y, x), 6: (y, h - x), 7: (w - y, h - x), 8: (w - y, x),
    }.get(geometry.orientation, (x, y))


def _image_index(item: dict, image_count: int) -> int:
    number = item.get("image", 1)
    if not isinstance(number, int) or not 1 <= number <= max(image_count, 1):
        raise ParseError(f"image number {number!r} is not one of 1 to {image_count}")
    return number - 1


def _boxed_items(value, key: str) -> list[dict]:
    if isinstance(value, dict):  # a single item, or {"objects": [...]}-style wrappers real models emit
        lists = [v for v in value.values() if isinstance(v, list) and all(isinstance(i, dict) for i in v)]
        value = lists[0] if lists else [value]
    if not isinstance(value, list):
        raise ParseError(f"expected a JSON array of objects with {key!r}, got {type(value).__name__}")
    return [item for item in value if isinstance(item, dict)]


def _coordinates(item: dict) -> list[float] | None:
    box = item.get("bbox_2d", item.get("bbox"))
    if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        return box
    return None


def parse(task: str, family: str, text: str, images: list[ImageGeometry], cut: bool = False):
    """The typed result of `task` in `text`; ParseError when the answer holds none. `cut`: max_tokens
    ended the answer (finish reason LENGTH), which then holds no result (CutAnswer)."""
    if cut:
        raise CutAnswer(f"max_tokens cut the answer before its {task} result was complete (finish reason "
                        f"LENGTH); no result is given for a part of one: raise max_tokens (unset: {task}'s "
                        f"default, {DEFAULT_MAX_TOKENS.get(task)})")
    if task == CAPTION:
        return Caption(text.strip())
    if task == VQA:
        return None
    if task == DOCUMENT:
        fenced = _FENCE.search(text)
        return Document((fenced.group(1) if fenced else text).strip())
    if task == GROUNDING:
        result = Detections()
        for item in _boxed_items(find_json(text), "bbox_2d"):
            coordinates, label = _coordinates(item), item.get("label")
            if coordinates is None or not isinstance(label, str):
                continue  # an item without a box or label is skipped, not guessed
            index = _image_index(item, len(images))
            box = to_original(coordinates, family, images[index])
            if box is None:
                result.boxes_outside += 1
            else:
                result.detections.append(Detection(label, box, index))
        return result
    if task == OCR:
        result = TextLines()
        for item in _boxed_items(find_json(text), "text_content"):
            content = item.get("text_content", item.get("text"))
            if not isinstance(content, str):
                continue
            index = _image_index(item, len(images))
            coordinates, box = _coordinates(item), None
            if coordinates is not None and images:
                box = to_original(coordinates, family, images[index])
                result.boxes_outside += box is None  # the line stays, without its box
            result.lines.append(TextLine(content, box, index))
        return result
    if task == CHART:
        try:
            value = find_json(text)
        except ParseError:
            return markdown_table(text)
        if not isinstance(value, dict) or not isinstance(value.get("header"), list):
            raise ParseError(f"expected {{\"header\": [...], \"rows\": [[...]]}}, got {_preview(json.dumps(value))}")
        rows = [[str(cell) for cell in row] for row in value.get("rows", []) if isinstance(row, list)]
        return Table([str(cell) for cell in value["header"]], rows)
    raise TaskError(f"unknown task {task!r}")


def markdown_table(text: str) -> Table:
    """The first Markdown table in `text` (what models write for charts when not constrained)."""
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    cells = [row for row in cells if not all(re.fullmatch(r":?-{3,}:?", cell) for cell in row if cell)]
    if not cells:
        raise ParseError(f"no JSON table and no Markdown table in the answer ({_preview(text)})")
    return Table(cells[0], cells[1:])
