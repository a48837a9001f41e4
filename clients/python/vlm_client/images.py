"""Turn what callers have (paths, bytes, PIL images, URLs) into `vlm.v1.Image` messages, and the
service's boxes (pixels of the image file as stored) into boxes on the upright picture viewers show."""

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


# EXIF orientation (1 to 8): a point (x, y) of a w x h stored grid on the upright picture, as
# Pillow's ImageOps.exif_transpose (and browsers, and image viewers) turn the grid.
_UPRIGHT = {
    1: lambda x, y, w, h: (x, y), 2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y), 4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x), 6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x), 8: lambda x, y, w, h: (y, w - x),
}


def upright_box(box: vlm_pb2.Box, stored_size: tuple[int, int], orientation: int) -> tuple[float, float, float, float]:
    """A box of the service (vlm.v1.Box: pixels of the image file's stored grid, EXIF orientation
    not applied) on the upright picture, the grid turned by its EXIF `orientation`:
    (x_min, y_min, x_max, y_max)."""
    turn = _UPRIGHT.get(orientation, _UPRIGHT[1])
    corners = [turn(x, y, *stored_size) for x in (box.x_min, box.x_max) for y in (box.y_min, box.y_max)]
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    return min(xs), min(ys), max(xs), max(ys)


def stored_orientation(source: Any) -> tuple[tuple[int, int], int] | None:
    """((width, height) of the stored grid, EXIF orientation) of what `to_image(source)` sends, as the
    service reads it (a late PNG eXIf chunk included); None for a URL or what is no image. A PIL
    image is sent as its pixels (orientation 1)."""
    from PIL import ExifTags, Image

    if hasattr(source, "save") and hasattr(source, "mode"):
        return source.size, 1
    message = to_image(source)
    if message.WhichOneof("source") != "data":
        return None
    try:
        with Image.open(io.BytesIO(message.data)) as image:
            image.load()  # a PNG's eXIf chunk may follow its pixel data: read only then
            return image.size, image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, Image.DecompressionBombError):
        return None
