"""What an image shows, from cheap statistics of its pixels: a photo, a document or a diagram.

The kind chooses the resolution an image is processed at (`resolution presets`) and, for the
`auto` model, which model answers. Statistics, not a learned model: a decoded image is sampled
down to at most `ANALYSIS_SIDE` pixels a side (nearest neighbour: thin strokes survive as
pixels, none is blended into grey), then

- `flat_share`: share of horizontally adjacent pixel pairs that are equal. Rendered pages and
  drawings are mostly flat areas; photographs (and scans) carry sensor noise and shading.
- `ink_share`: share of pixels that stand out from their block's background (the median of a
  16x16 block), so a shaded scan or a dark-mode screenshot has ink as well as a white page.
- `smooth_share`: share of horizontally adjacent pixels within a few grey levels: paper, sky
  and walls are smooth, grass and gravel are not.
- `text_share`: share of the ink in words: short horizontal runs with another run close by, on
  rows crossed by many runs.
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
SMOOTH_STEP = 4  # grey levels between neighbours on paper, sky or a wall
WORD_GAP = 3  # pixels between the strokes of a word at most
SATURATED_SPREAD = 60  # grey levels between a pixel's strongest and weakest channel
# Thresholds of `kind_of`, set on the tuning corpus of perf/image_corpus.py (see perf/RESULTS.md).
RENDERED_FLAT_SHARE = 0.5
RENDERED_TEXT_SHARE = 0.55
PHOTOGRAPHED_TEXT_SHARE = 0.7
PHOTOGRAPHED_SMOOTH_SHARE = 0.35
PHOTOGRAPHED_COLOUR_SHARE = 0.15  # a page photographed is dark ink on paper
MIN_INK_SHARE = 0.002


class ImageKind(str, Enum):
    PHOTO = "photo"
    DOCUMENT = "document"  # text-heavy pages and screenshots
    DIAGRAM = "diagram"  # charts, plots, diagrams and schematics


@dataclass(frozen=True)
class ImageStatistics:
    flat_share: float
    smooth_share: float
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


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in each row: (row, length, whether the run has a neighbour on its
    row within WORD_GAP pixels) arrays."""
    height, width = mask.shape
    padded = np.zeros((height, width + 1), dtype=np.int8)  # a False column ends each row's last run
    padded[:, 1:] = mask
    edges = np.diff(padded.ravel(), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    rows = starts // (width + 1)
    close = (starts[1:] - ends[:-1] <= WORD_GAP) & (rows[1:] == rows[:-1])
    clustered = np.zeros(len(starts), dtype=bool)
    clustered[1:] |= close
    clustered[:-1] |= close
    return rows, ends - starts, clustered


def statistics(image: Image.Image) -> ImageStatistics:
    """The statistics of a decoded image of any size and mode."""
    rgb = _sample(image)
    height, width, _ = rgb.shape
    red, green, blue = (rgb[..., channel].astype(np.int32) for channel in range(3))
    colour = (red << 16) | (green << 8) | blue
    flat_share = np.count_nonzero(colour[:, 1:] == colour[:, :-1]) / colour[:, 1:].size
    grey = (red * 77 + green * 150 + blue * 29) >> 8  # ITU-R 601 luma
    smooth_share = np.count_nonzero(np.abs(grey[:, 1:] - grey[:, :-1]) <= SMOOTH_STEP) / grey[:, 1:].size

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
        return ImageStatistics(flat_share, smooth_share, 0.0, 0.0, 0.0, 0.0)

    rows, lengths, clustered = _runs(ink)
    runs_per_row = np.bincount(rows, minlength=height)
    on_text_rows = runs_per_row[rows] >= TEXT_ROW_RUNS
    text_share = float(lengths[(lengths <= SHORT_RUN) & on_text_rows & clustered].sum() / ink_pixels)
    _, vertical, _ = _runs(ink.T)
    line_share = float((lengths[lengths >= LONG_RUN].sum() + vertical[vertical >= LONG_RUN].sum()) / ink_pixels)

    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    colour_share = float(np.count_nonzero(ink & (spread > SATURATED_SPREAD)) / ink_pixels)
    return ImageStatistics(flat_share, smooth_share, ink_pixels / ink.size, text_share, line_share, colour_share)


def classify(image: Image.Image) -> ImageKind:
    return kind_of(statistics(image))


def kind_of(stats: ImageStatistics) -> ImageKind:
    """Rendered images (mostly flat: no sensor noise) are documents when most of their ink is in
    words (short strokes close together along rows), else diagrams. Photographed ones are
    documents only when the words stand on smooth, grey paper (fine texture such as grass also
    makes short strokes), else photos. An image with almost no ink (a solid colour) is a photo,
    the cheapest preset."""
    if stats.flat_share >= RENDERED_FLAT_SHARE:
        if stats.text_share >= RENDERED_TEXT_SHARE:
            return ImageKind.DOCUMENT
        return ImageKind.DIAGRAM if stats.ink_share >= MIN_INK_SHARE else ImageKind.PHOTO
    if (stats.text_share >= PHOTOGRAPHED_TEXT_SHARE and stats.smooth_share >= PHOTOGRAPHED_SMOOTH_SHARE
            and stats.colour_share < PHOTOGRAPHED_COLOUR_SHARE):
        return ImageKind.DOCUMENT
    return ImageKind.PHOTO
