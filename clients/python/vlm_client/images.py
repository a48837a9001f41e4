"""Turn what callers have (paths, bytes, PIL images, URLs) into `vlm.v1.Image` messages."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from vlm.v1 import vlm_pb2


# Modes PNG stores as they are; the others become what the service would make of them anyway.
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def png_ready(image):
    """`image` in a mode PNG can store: float greyscale (F) clipped to 8 bits as the service does,
    any other mode (CMYK, YCbCr, LAB, ...) converted to RGB."""
    if image.mode in _PNG_MODES:
        return image
    if image.mode == "F":
        import numpy as np
        from PIL import Image

        return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


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
        png_ready(source).save(buffer, "PNG")
        return vlm_pb2.Image(data=buffer.getvalue())
    raise TypeError(f"cannot send {type(source).__name__} as an image; use a path, bytes, a URL or a PIL image")
