"""The vision encoder's inputs: per-image tensors, packed for one graph call and unpacked again.

Both towers attend within an image only and are otherwise row-wise, so any number of images
(from any number of requests) run as one call on their rows concatenated. What makes that a pure
tensor graph is that the data-dependent index tensors (rotary positions, attention segment bounds,
Qwen's window order) are computed here, on the CPU, per image, and only joined for the call:

- ``rows`` tensors concatenate (pixel patches, positions);
- ``index`` tensors concatenate with each image's values moved past the rows before it
  (Qwen's window order over merged tokens);
- ``bounds`` tensors are cumulative boundaries ``[0, ...]``: each image's part continues from the
  previous image's end (``cu_seqlens``).

A packed set of images carries its `layout` (entries per image of every tensor), so an encoder
that caches per image can split a request's tensors back into images without recomputing them.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

Kind = Literal["rows", "index", "bounds"]


@dataclass(frozen=True)
class InputSpec:
    name: str  # graph input name; the Triton tensor is its upper-case form
    kind: Kind
    dtype: type
    row_dims: tuple[int, ...]  # shape of one entry (-1: depends on the checkpoint)


# Qwen2.5-VL: patches of 3 * temporal * patch * patch values; one output row per merged 2x2 block.
QWEN_SPEC = (
    InputSpec("pixel_values", "rows", np.float32, (-1,)),
    InputSpec("position_ids", "rows", np.int64, (2,)),
    InputSpec("cu_seqlens", "bounds", np.int32, ()),
    InputSpec("window_index", "index", np.int64, ()),
    InputSpec("cu_window_seqlens", "bounds", np.int32, ()),
)
# Pixtral (+ Llava projector): 16x16 patches flattened channel-major; one output row per patch.
PIXTRAL_SPEC = (
    InputSpec("pixel_values", "rows", np.float32, (-1,)),
    InputSpec("position_ids", "rows", np.int64, (2,)),
    InputSpec("cu_seqlens", "bounds", np.int32, ()),
)
SPECS = {"qwen2_5_vl": QWEN_SPEC, "pixtral": PIXTRAL_SPEC}
# The tensor whose entries per image equal the image's output rows (its image tokens).
OUTPUT_ROWS_FROM = {"qwen2_5_vl": "window_index", "pixtral": "pixel_values"}
OUTPUT_NAME = "image_embeds"

ImageInputs = dict[str, np.ndarray]  # one image's tensors, image-local ("bounds" start at 0)


@dataclass
class PackedImages:
    """Graph inputs for several images and where each image's entries lie."""

    tensors: dict[str, np.ndarray]
    layout: np.ndarray  # int64 [images, len(spec)]: entries per image of each tensor, in spec order

    @property
    def count(self) -> int:
        return len(self.layout)


def _empty(spec: InputSpec) -> np.ndarray:
    """The tensor for no images (a text-only request); checkpoint-dependent widths become 0."""
    if spec.kind == "bounds":
        return np.zeros(1, dtype=spec.dtype)
    return np.zeros((0, *(max(d, 0) for d in spec.row_dims)), dtype=spec.dtype)


def pack(images: list[ImageInputs], spec: tuple[InputSpec, ...]) -> PackedImages:
    """Join image-local tensors into one graph call's inputs."""
    layout = np.zeros((len(images), len(spec)), dtype=np.int64)
    tensors = {}
    for column, entry in enumerate(spec):
        parts, offset = [], 0
        for row, image in enumerate(images):
            value = np.asarray(image[entry.name], dtype=entry.dtype)
            if entry.kind == "rows":
                parts.append(value)
                layout[row, column] = len(value)
            elif entry.kind == "index":
                parts.append(value + offset)
                offset += len(value)
                layout[row, column] = len(value)
            else:  # bounds: drop the image's leading 0, continue from the previous end
                parts.append(value[1:] + offset)
                offset += int(value[-1])
                layout[row, column] = len(value) - 1
        if entry.kind == "bounds":
            parts.insert(0, np.zeros(1, dtype=entry.dtype))
        if not parts:
            tensors[entry.name] = _empty(entry)
        else:  # one part (a lone image's rows) is taken as it is: concatenating it would only copy it
            joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
            tensors[entry.name] = joined.astype(entry.dtype, copy=False)
    return PackedImages(tensors, layout)


def unpack(packed: PackedImages, spec: tuple[InputSpec, ...]) -> list[ImageInputs]:
    """The inverse of `pack`: image-local tensors of every image."""
    images: list[ImageInputs] = [{} for _ in range(packed.count)]
    for column, entry in enumerate(spec):
        value = packed.tensors[entry.name]
        start = 1 if entry.kind == "bounds" else 0
        for row in range(packed.count):
            count = int(packed.layout[row, column])
            part = value[start : start + count]
            if entry.kind == "rows":
                images[row][entry.name] = part
            elif entry.kind == "index":  # moved past the entries before it in `pack`
                images[row][entry.name] = part - start
            else:
                base = value[start - 1]
                images[row][entry.name] = np.concatenate([[0], part - base]).astype(entry.dtype)
            start += count
    return images


def split_per_image(embeddings: np.ndarray, images: list[ImageInputs], family: str) -> list[np.ndarray]:
    """The encoder's output rows for `images`, joined, split back into one array per image."""
    rows = [len(image[OUTPUT_ROWS_FROM[family]]) for image in images]
    return np.split(embeddings, np.cumsum(rows)[:-1])


# The graph takes each "bounds" input as the two index tensors of `segment_layout`, under these names.
SEGMENT_INPUTS = {"cu_seqlens": "segment", "cu_window_seqlens": "window"}


def segment_layout(bounds: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention segments (images, or Qwen's windows) as a padded batch, for one batched attention
    call that costs segments x longest^2 instead of rows^2:

    - gather int64 [segments, longest]: the row in each slot; padding slots hold `rows` (the graph
      appends one zero row there and masks those keys);
    - scatter int64 [rows]: each row's slot in the flattened [segments * longest] batch.
    """
    lengths = np.diff(bounds.astype(np.int64))
    longest = int(lengths.max()) if len(lengths) else 0
    slots = np.arange(longest)[None, :]
    gather = bounds[:-1, None].astype(np.int64) + slots
    gather[slots >= lengths[:, None]] = rows
    segment_of_row = np.repeat(np.arange(len(lengths)), lengths)
    scatter = segment_of_row * longest + (np.arange(rows) - bounds[:-1].astype(np.int64)[segment_of_row])
    return gather, scatter


def graph_inputs(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed encoder inputs -> the exported graph's inputs (bounds become segment layouts)."""
    rows = len(tensors["pixel_values"])
    inputs = {}
    for name, value in tensors.items():
        if name in SEGMENT_INPUTS:
            gather, scatter = segment_layout(value, rows)
            inputs[f"{SEGMENT_INPUTS[name]}_gather"], inputs[f"{SEGMENT_INPUTS[name]}_scatter"] = gather, scatter
        else:
            inputs[name] = value
    return inputs


def image_digest(image: ImageInputs) -> bytes:
    """A content hash of one preprocessed image: its patches and index tensors (shape included)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(image):
        value = np.ascontiguousarray(image[name])
        digest.update(name.encode() + str(value.shape).encode() + str(value.dtype).encode())
        digest.update(value.data)
    return digest.digest()


@functools.lru_cache(maxsize=256)
def _qwen_indices(grid: tuple[int, int, int], merge: int, window_size: int, patch_size: int) -> ImageInputs:
    """A grid's index tensors (read-only, shared: images of one size repeat, and so do these), as
    transformers.vision_utils computes them (get_vision_position_ids, get_vision_cu_seqlens,
    get_vision_window_index), in numpy: preprocessing imports no torch. Equal values are tested."""
    t, h, w = grid
    # Rotary positions (row, col) of each patch, merge-block by merge-block, repeated per frame.
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = (h // merge, merge, w // merge, merge)
    position_ids = np.stack([rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1),
                             cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)], axis=-1)
    # Merged tokens in window order: windows of `side` x `side` merged tokens, row-major, the last row
    # and column of windows cut short by the image's edge; each window's patches continue the bounds.
    side = window_size // merge // patch_size
    merged_h, merged_w = h // merge, w // merge
    index = np.arange(t * merged_h * merged_w).reshape(t, merged_h, merged_w)
    padded_h, padded_w = merged_h + side - merged_h % side, merged_w + side - merged_w % side
    windows = np.full((t, padded_h, padded_w), -100, dtype=np.int64)
    windows[:, :merged_h, :merged_w] = index
    windows = windows.reshape(t, padded_h // side, side, padded_w // side, side).transpose(0, 1, 3, 2, 4)
    windows = windows.reshape(t, -1, side * side)
    window_index = windows[windows != -100]
    bounds = np.concatenate([[0], np.cumsum((windows != -100).sum(-1).reshape(-1)) * merge * merge])
    indices = {
        "position_ids": np.tile(position_ids, (t, 1)).astype(np.int64),
        "cu_seqlens": np.arange(t + 1, dtype=np.int32) * (h * w),
        "window_index": window_index.astype(np.int64),
        # A window wholly in the padding adds no patch and repeats a bound: kept once (unique_consecutive).
        "cu_window_seqlens": bounds[np.concatenate([[True], np.diff(bounds) != 0])].astype(np.int32),
    }
    for value in indices.values():
        value.setflags(write=False)
    return indices


def qwen_image_inputs(patches: np.ndarray, grid_thw: np.ndarray, vision_config) -> ImageInputs:
    """One Qwen2.5-VL image's encoder inputs, with transformers' own index functions."""
    grid = tuple(int(v) for v in np.asarray(grid_thw).reshape(3))
    indices = _qwen_indices(grid, int(vision_config.spatial_merge_size), int(vision_config.window_size),
                            int(vision_config.patch_size))
    return {"pixel_values": patches, **indices}


def pixtral_image_inputs(patches: np.ndarray, rows: int, cols: int) -> ImageInputs:
    """One Pixtral image's encoder inputs: patches in row-major order, (row, col) per patch."""
    row_ids, col_ids = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return {
        "pixel_values": patches,
        "position_ids": np.stack([row_ids.reshape(-1), col_ids.reshape(-1)], axis=-1).astype(np.int64),
        "cu_seqlens": np.array([0, rows * cols], dtype=np.int32),
    }
