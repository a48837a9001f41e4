"""What an image shows, from cheap statistics of its pixels: a photo, a document or a diagram.

The kind chooses the resolution an image is processed at (`resolution presets`) and, for the
`auto` model, which model answers. Statistics, not a learned model: a decoded image is sampled
down to at most `ANALYSIS_SIDE` pixels a side (nearest neighbour: thin strokes survive as
pixels, none is blended into grey), then

- `flat_share`: share of horizontally adjacent pixel pairs that are equal. Rendered pages and
  drawings are mostly flat areas; photographs (and scans) carry sensor noise and shading.
- `ink_share`: share of pixels that stand out from their block's background (the median of a
  16x16 block), so a shaded scan or a dark-mode screenshot has ink as well as a white page.
- `text_share`: share of the ink in short horizontal runs on rows crossed by many runs: lines
  of glyphs.
- `line_share`: share of the ink in long horizontal or vertical runs: axes, grid lines, wires,
  boxes and arrows.
- `colour_share`: share of the ink that is saturated: chart series, fills, node colours.

See `kind_of` for how they combine; perf/RESULTS.md for the accuracy on a corpus of real images
and the time per megapixel (`python -m perf.image_kinds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image

ANALYSIS_SIDE = 256
BLOCK = 16
INK_CONTRAST = 40  # grey levels from the block's background
SHORT_RUN = 6  # pixels at analysis size: a glyph stroke's width or a letter
LONG_RUN = 24
TEXT_ROW_RUNS = 6  # runs a row of text crosses at least
SATURATED_SPREAD = 60  # grey levels between a pixel's strongest and weakest channel
# Thresholds of `kind_of`, set on the corpus of perf/image_corpus.py (see perf/RESULTS.md).
RENDERED_FLAT_SHARE = 0.5
RENDERED_TEXT_SHARE = 0.65
RENDERED_COLOUR_SHARE = 0.35  # slides and web pages have coloured headings and links
PHOTOGRAPHED_TEXT_SHARE = 0.75
PHOTOGRAPHED_COLOUR_SHARE = 0.15  # a page photographed is dark ink on paper
TEXT_MAX_LINE_SHARE = 0.35
MIN_INK_SHARE = 0.002


class ImageKind(str, Enum):
    PHOTO = "photo"
    DOCUMENT = "document"  # text-heavy pages and screenshots
    DIAGRAM = "diagram"  # charts, plots, diagrams and schematics


@dataclass(frozen=True)
class ImageStatistics:
    flat_share: float
    ink_share: float
    text_share: float
    line_share: float
    colour_share: float


def _sample(image: Image.Image) -> np.ndarray:
    """RGB uint8, longest side at most ANALYSIS_SIDE, both sides multiples of BLOCK."""
    width, height = image.size
    scale = min(1.0, ANALYSIS_SIDE / max(width, height))
    size = (max(BLOCK, round(width * scale / BLOCK) * BLOCK), max(BLOCK, round(height * scale / BLOCK) * BLOCK))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image.resize(size, Image.Resampling.NEAREST))


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal runs of True in each row: (row, length) arrays."""
    height, width = mask.shape
    padded = np.zeros((height, width + 1), dtype=np.int8)  # a False column ends each row's last run
    padded[:, 1:] = mask
    edges = np.diff(padded.ravel(), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return starts // (width + 1), ends - starts


def statistics(image: Image.Image) -> ImageStatistics:
    """The statistics of a decoded image of any size and mode."""
    rgb = _sample(image)
    height, width, _ = rgb.shape
    red, green, blue = (rgb[..., channel].astype(np.int32) for channel in range(3))
    colour = (red << 16) | (green << 8) | blue
    flat_share = np.count_nonzero(colour[:, 1:] == colour[:, :-1]) / colour[:, 1:].size
    grey = (red * 77 + green * 150 + blue * 29) >> 8  # ITU-R 601 luma

    # The median of every other pixel of each block, both ways: one of the samples (never the mean
    # of two, which would be neither the paper nor a bar's colour where a block holds both).
    samples = grey.reshape(height // BLOCK, BLOCK, width // BLOCK, BLOCK)[:, ::2, :, ::2].transpose(0, 2, 1, 3)
    samples = samples.reshape(height // BLOCK, width // BLOCK, -1)
    middle = samples.shape[-1] // 2
    background = np.partition(samples, middle, axis=-1)[..., middle]
    background = np.repeat(np.repeat(background, BLOCK, axis=0), BLOCK, axis=1)
    ink = np.abs(grey - background) > INK_CONTRAST
    ink_pixels = int(np.count_nonzero(ink))
    if ink_pixels == 0:
        return ImageStatistics(flat_share, 0.0, 0.0, 0.0, 0.0)

    rows, lengths = _runs(ink)
    runs_per_row = np.bincount(rows, minlength=height)
    on_text_rows = runs_per_row[rows] >= TEXT_ROW_RUNS
    text_share = float(lengths[(lengths <= SHORT_RUN) & on_text_rows].sum() / ink_pixels)
    _, vertical = _runs(ink.T)
    line_share = float((lengths[lengths >= LONG_RUN].sum() + vertical[vertical >= LONG_RUN].sum()) / ink_pixels)

    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    colour_share = float(np.count_nonzero(ink & (spread > SATURATED_SPREAD)) / ink_pixels)
    return ImageStatistics(flat_share, ink_pixels / ink.size, text_share, line_share, colour_share)


def classify(image: Image.Image) -> ImageKind:
    return kind_of(statistics(image))


def kind_of(stats: ImageStatistics) -> ImageKind:
    """Text-heavy: most ink in lines of glyphs, little of it in long lines or colour. The bars are
    stricter for photographed images (`flat_share` low: sensor noise), whose fine texture also
    makes short runs. Otherwise rendered images (mostly flat) are diagrams and the rest are photos;
    an image with almost no ink (a solid colour) counts as a photo, the cheapest preset."""
    if stats.flat_share >= RENDERED_FLAT_SHARE:
        text_bar, colour_bar = RENDERED_TEXT_SHARE, RENDERED_COLOUR_SHARE
    else:
        text_bar, colour_bar = PHOTOGRAPHED_TEXT_SHARE, PHOTOGRAPHED_COLOUR_SHARE
    if stats.text_share >= text_bar and stats.line_share < TEXT_MAX_LINE_SHARE and stats.colour_share < colour_bar:
        return ImageKind.DOCUMENT
    if stats.flat_share >= RENDERED_FLAT_SHARE and stats.ink_share >= MIN_INK_SHARE:
        return ImageKind.DIAGRAM
    return ImageKind.PHOTO
