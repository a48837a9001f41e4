"""The arithmetic both images and video clips go through: transformers' normalization as a lookup
table, normalization fused with patchify, and Qwen2-VL's target size on its patch grid."""

from __future__ import annotations

import math

import numpy as np


def normalization_table(rescale_factor: float, mean: list[float], std: list[float]) -> np.ndarray:
    """float32 [3, 256]: the normalized value of every uint8 level per channel.

    Computed with transformers' own arithmetic (rescale in float64, cast to float32, then
    (x - mean) / std in float32), so a lookup gives bit-identical values.
    """
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean32) / std32


# Pixel values `normalize_patches` handles per step: the step's indices and values (12 bytes a value)
# stay in the CPU's cache from the lookup to the write.
NORMALIZE_STEP_VALUES = 1 << 16


def normalize_patches(pixels: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """Normalize and patchify in one pass: out[i, ..., c, t, y, x] = table[c, pixels[i, ..., c, y, x]]
    for every temporal slot t.

    `pixels`: uint8 [rows, ..., 3, py, px], the resized picture seen as patches (a transposed view of
    it: nothing copied yet). `out`: float32 [rows, ..., 3, temporal, py, px]. A few rows at a time, the
    bytes are copied once into channel-major indices (the transpose and the widening to numpy's index
    type in one copy), looked up in their channel's 256 values and written to every temporal slot. The
    whole-array form of the same steps went through temporaries of up to 8 bytes a value, twice the
    size of the output, each written and read back from memory: twice the time.
    """
    rows = len(pixels)
    step = max(1, NORMALIZE_STEP_VALUES // pixels[0].size)
    by_channel = np.moveaxis(pixels, -3, 0)  # [3, rows, ..., py, px]
    indices = np.empty((3, min(step, rows), *by_channel.shape[2:]), dtype=np.intp)
    values = np.empty(indices.shape, dtype=np.float32)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        count = stop - start
        np.copyto(indices[:, :count], by_channel[:, start:stop])
        for channel in range(3):
            # mode="clip" (uint8 indices are always in range) lets np.take write into `values` directly.
            np.take(table[channel], indices[channel, :count], out=values[channel, :count], mode="clip")
            out[start:stop, ..., channel, :, :, :] = values[channel, :count, ..., None, :, :]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, pixel count within bounds, aspect kept."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
