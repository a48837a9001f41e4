"""Turn what callers have (paths, bytes, PIL images, URLs) into `vlm.v1.Image` messages."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from vlm.v1 import vlm_pb2


def to_image(source: Any) -> vlm_pb2.Image:
    if isinstance(source, vlm_pb2.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return vlm_pb2.Image(data=bytes(source))
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return vlm_pb2.Image(url=source)
    if isinstance(source, (str, Path)):
        return vlm_pb2.Image(data=Path(source).read_bytes())
    if hasattr(source, "save") and hasattr(source, "mode"):  # a PIL image, sent losslessly
        buffer = io.BytesIO()
        source.save(buffer, "PNG")
        return vlm_pb2.Image(data=buffer.getvalue())
    raise TypeError(f"cannot send {type(source).__name__} as an image; use a path, bytes, a URL or a PIL image")
