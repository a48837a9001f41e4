"""Decode untrusted image bytes into RGB pictures, refusing bad input before any heavy work.

The checks run in the order of their cost: empty data, then the magic bytes, then the header
(format and pixel count, so a decompression bomb is refused before a single pixel is decoded),
then the full decode (truncated or corrupt data). Every refusal is an `ImageError` whose message
says what was wrong and what is accepted.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

# A truncated file must fail, never decode as a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Formats by magic bytes, checked before Pillow parses anything.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (_PNG_SIGNATURE, "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


class ImageError(ValueError):
    """An image that cannot be served; the message is meant for the caller."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds applied to every image before it is decoded."""

    max_bytes: int = 20 * 1024 * 1024
    # Checked against the header's width x height before decoding (decompression-bomb guard).
    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 200.0


def sniff_format(data: bytes) -> str | None:
    """The image format that `data` starts with, or None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def check_encoded(data: bytes, limits: ImageLimits = ImageLimits()) -> str:
    """The format of `data` after the checks that need no parsing (empty, size, magic bytes).

    Raises ImageError without a position; the gateway runs this before a request reaches Triton.
    """
    if len(data) == 0:
        raise ImageError("empty image data (0 bytes); send the encoded file's bytes")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{len(data)} bytes is over the limit of {limits.max_bytes} bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            f"not a supported image file (first bytes {data[:8]!r}); "
            f"supported formats: {', '.join(SUPPORTED_FORMATS)}"
        )
    return fmt


# EXIF orientations that turn the picture a quarter: width and height swap.
_QUARTER_TURNS = (5, 6, 7, 8)


def upright_size(data: bytes, limits: ImageLimits = ImageLimits(), index: int = 0) -> tuple[int, int]:
    """(width, height) of the upright picture, from the header alone: nothing is decoded."""
    image = _open_checked(data, limits, f"image {index}")
    width, height = image.size
    if _orientation(image, data) in _QUARTER_TURNS:
        return height, width
    return width, height


def stored_geometry(data: bytes, limits: ImageLimits = ImageLimits(), index: int = 0) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of the file's stored pixel grid, from the header alone."""
    image = _open_checked(data, limits, f"image {index}")
    return image.width, image.height, _orientation(image, data)


def _orientation(image: Image.Image, data: bytes) -> int:
    """The EXIF orientation `decode_image` turns the picture by (1 when none or unreadable: decoding
    reports a bad file), read without decoding a pixel."""
    try:
        if image.format != "PNG":
            return image.getexif().get(ExifTags.Base.Orientation, 1)
        # Pillow's PNG getexif() decodes the whole picture to reach an eXIf chunk that follows the
        # pixel data (it is read on load(), and decoding then turns the picture by it). Found from
        # the chunk headers instead, the base getexif() reads it with Pillow's other sources (XMP,
        # a "Raw profile type exif" text) and decodes nothing.
        if "exif" not in image.info:
            image.info["exif"] = _png_exif_chunk(data) or None
        return Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1


def _png_exif_chunk(data: bytes) -> bytes:
    """The body of a PNG's eXIf chunk wherever it lies (b"" when none), from the chunk headers alone."""
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"eXIf":
            return data[position + 8 : position + 8 + length]
        if kind == b"IEND":
            break
        position += 12 + length  # length, type, body, CRC
    return b""


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), index: int = 0) -> Image.Image:
    """Decode one encoded image into an upright RGB picture.

    `index` only names the image in error messages ("image 2: ...").
    """
    where = f"image {index}"
    image = _open_checked(data, limits, where)
    try:
        image.seek(0)  # first frame of an animated GIF or WebP
        image.load()
    except Exception as exc:
        raise ImageError(f"{where}: truncated or corrupt {image.format} data ({exc})") from None
    # In place: otherwise exif_transpose returns a copy of every picture it does not turn.
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def _open_checked(data: bytes, limits: ImageLimits, where: str) -> Image.Image:
    """The opened image (header read, no pixel decoded), within every limit the header can show."""
    try:
        fmt = check_encoded(data, limits)
    except ImageError as exc:
        raise ImageError(f"{where}: {exc}") from None
    try:
        # Image.open reads only the header: size and mode are known, no pixel is decoded yet.
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:  # Pillow's own, looser guard tripped first
        raise ImageError(
            f"{where}: {exc}; the limit here is {limits.max_pixels} pixels (decompression-bomb guard)"
        ) from None
    except Exception as exc:
        raise ImageError(f"{where}: cannot read the {fmt} header ({exc})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{where}: {fmt} header gives an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{where}: {width}x{height} = {width * height} pixels is over the limit of "
            f"{limits.max_pixels} pixels (decompression-bomb guard); downscale the image"
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ImageError(
            f"{where}: aspect ratio {width}x{height} is more extreme than "
            f"{limits.max_aspect_ratio:g}:1; crop or pad the image"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over white."""
    mode = image.mode
    if mode == "RGB" and image.info.get("transparency") is None:  # an RGB PNG may key one colour as transparent
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) greyscale: keep the top 8 bits rather than clipping at 255.
        values = np.asarray(image, dtype=np.uint32)
        shift = 8 if mode.startswith("I;16") or values.max(initial=0) <= 0xFFFF else 24
        grey = (values >> shift).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    # Same rule as transformers' convert_to_rgb, so both give the same pixels.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
