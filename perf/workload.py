"""The benchmark workload: real encoded images of mixed sizes and formats, prompts, and the same
requests as perf_analyzer input files, Triton tensors and public-API messages."""

from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height, format): a photo-sized JPEG, a screenshot-sized PNG, a portrait WebP, a small GIF.
IMAGE_SPECS = [(640, 480, "JPEG"), (800, 600, "PNG"), (300, 450, "WEBP"), (160, 120, "GIF")]
PROMPTS = ["What is in this picture?", "Describe the scene in detail.", "What colours dominate?",
           "Is there any text in the image?"]


def synthetic_image(width: int, height: int, fmt: str, seed: int) -> bytes:
    """A picture with gradients, shapes and noise (compresses like a photo, not like a flat fill)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@dataclass(frozen=True)
class WorkItem:
    prompt: str
    image: bytes | None  # None: a text-only request
    max_tokens: int | None = None  # None: the run's


# The mixed workload of the scheduling benchmarks: most answers short, some long.
SHORT_TOKENS, LONG_TOKENS = 16, 128


def mixed_workload(count: int = 20) -> list[WorkItem]:
    """1 request in 5 asks for a long answer; every other one carries an image."""
    items = []
    for i in range(count):
        spec = IMAGE_SPECS[(i // 2) % len(IMAGE_SPECS)]
        image = synthetic_image(*spec, seed=100 + i) if i % 2 == 0 else None
        items.append(WorkItem(PROMPTS[i % len(PROMPTS)], image, LONG_TOKENS if i % 5 == 4 else SHORT_TOKENS))
    return items


def workload(count: int = 16, with_images: bool = True) -> list[WorkItem]:
    items = []
    for i in range(count):
        spec = IMAGE_SPECS[i % len(IMAGE_SPECS)]
        image = synthetic_image(*spec, seed=i) if with_images else None
        items.append(WorkItem(PROMPTS[i % len(PROMPTS)], image))
    return items


def messages(item: WorkItem) -> list[dict]:
    content = ([{"type": "image"}] if item.image else []) + [{"type": "text", "text": item.prompt}]
    return [{"role": "user", "content": content}]


def _serialized(values: list[bytes]) -> str:
    """Triton's BYTES wire form (4-byte little-endian length before each element), base64."""
    return base64.b64encode(b"".join(struct.pack("<I", len(v)) + v for v in values)).decode()


def perf_analyzer_input(items: list[WorkItem], max_tokens: int, stream: bool, path: Path) -> Path:
    """perf_analyzer's --input-data file: one entry per request, real encoded images."""
    data = []
    for item in items:
        entry = {
            "MESSAGES": {"content": {"b64": _serialized([json.dumps(messages(item)).encode()])}, "shape": [1]},
            "MAX_TOKENS": {"content": [max_tokens], "shape": [1]},
            "STREAM": {"content": [stream], "shape": [1]},
        }
        if item.image:
            entry["IMAGES"] = {"content": {"b64": _serialized([item.image])}, "shape": [1]}
        data.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}))
    return path
