"""Which pixel range an image is processed at: by its kind (detail AUTO), or forced LOW or HIGH.

The presets follow the two-stage pipeline this service grew from: diagrams need the most detail
(thin lines, small labels), text-heavy pages less, photographs least. Each is a range of pixel
counts (Qwen2.5-VL resizes into it, keeping the aspect ratio; Pixtral, which only scales down,
takes the square root of the upper bound as its longest edge), and is clamped to what the
checkpoint's own image processor allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

from vlm_serving.preprocessing.image_kind import ImageKind


class ImageDetail(str, Enum):
    AUTO = "auto"  # by each image's kind
    LOW = "low"  # the lowest preset for every image
    HIGH = "high"  # the highest preset for every image


@dataclass(frozen=True)
class PixelRange:
    min_pixels: int
    max_pixels: int

    def clamped(self, lowest: int, highest: int) -> "PixelRange":
        """Within the checkpoint's [lowest, highest]."""
        def clamp(value: int) -> int:
            return min(max(value, lowest), highest)
        return PixelRange(clamp(self.min_pixels), clamp(self.max_pixels))


def _default_presets() -> dict[ImageKind, PixelRange]:
    return {
        ImageKind.PHOTO: PixelRange(256 * 256, 768 * 768),
        ImageKind.DOCUMENT: PixelRange(512 * 512, 1024 * 1024),
        ImageKind.DIAGRAM: PixelRange(768 * 768, 1536 * 1536),
    }


@dataclass(frozen=True)
class ResolutionPresets:
    """A model's presets and the detail a request that names none gets."""

    presets: dict[ImageKind, PixelRange] = field(default_factory=_default_presets)
    default_detail: ImageDetail = ImageDetail.AUTO

    def range_for(self, kind: ImageKind, detail: ImageDetail | None) -> PixelRange:
        detail = detail or self.default_detail
        if detail == ImageDetail.LOW:
            return min(self.presets.values(), key=lambda preset: preset.max_pixels)
        if detail == ImageDetail.HIGH:
            return max(self.presets.values(), key=lambda preset: preset.max_pixels)
        return self.presets[kind]

    def to_json(self) -> str:
        return json.dumps({"default_detail": self.default_detail.value, "presets": {
            kind.value: [preset.min_pixels, preset.max_pixels] for kind, preset in self.presets.items()}})

    @classmethod
    def from_json(cls, text: str) -> "ResolutionPresets":
        """Raises ValueError naming what is wrong (a config edited by hand)."""
        data = json.loads(text)
        presets = {}
        for kind in ImageKind:
            low, high = (int(value) for value in data["presets"][kind.value])
            if not 0 < low <= high:
                raise ValueError(f"resolution preset {kind.value}: [{low}, {high}] pixels is not a range; "
                                 "give [min_pixels, max_pixels] with 0 < min <= max")
            presets[kind] = PixelRange(low, high)
        return cls(presets, ImageDetail(data.get("default_detail", "auto")))


def parse_detail(value: str | bytes | None) -> ImageDetail | None:
    """A request's detail ("auto", "low", "high"; empty: the model's default)."""
    if isinstance(value, bytes):
        value = value.decode()
    if not value:
        return None
    try:
        return ImageDetail(value.lower())
    except ValueError:
        raise ValueError(f"detail {value!r} is not one of auto, low, high") from None
