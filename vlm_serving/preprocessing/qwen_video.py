"""Qwen2.5-VL's native video input: sampled frames -> the tensors transformers' video processor makes.

`Qwen2VLVideoProcessor` (transformers 5.24), reproduced for frames already sampled
(`vlm_serving.preprocessing.video.decode_video`), as `Qwen2_5_VLProcessor` calls it:

- every frame resized to one size on the patch grid: `smart_resize` with factor patch x merge, within
  the checkpoint's video bounds (`checkpoint_config.qwen_video_processor_config`), each frame's
  maximum also capped at an even share of the clip's budget of `max_video_tokens` (below), as
  `cap_pixels_per_frame=True` does: the reference implementation's (qwen-vl-utils) behaviour, and
  transformers' announced default;
- the resize is torchvision's v2 `resize` on uint8 tensors (bicubic, antialias), not Pillow's as for
  images: on the CPU torchvision hands uint8 straight to torch's own kernel
  (`torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)`, fixed-point weights), and
  so does this module, so the pixels are the same bytes. Pillow's bicubic differs by a level or two in
  about 1% of pixels, which normalization turns into 0.015; a numpy reproduction of torch's kernel
  (its weights and fixed-point sums) was exact on 305 sizes but 17-33x slower. torch is imported on the
  first clip only: a preprocessing process that never sees a video stays as lean as before;
- an odd frame count padded with copies of the last frame, then temporal patches of
  `temporal_patch_size` (2) frames; patches float32 [t * h * w, 3 * 2 * 14 * 14] in transformers'
  order (time, merge-block row and column, row and column in the block; values channel, frame, y, x),
  normalized with transformers' fused arithmetic for videos ((x - mean * 255) / (std * 255) in float32);
- seconds per temporal patch = temporal_patch_size / the rate the frames were sampled at, as
  `Qwen2_5_VLProcessor` computes `second_per_grid_ts` from the clip's sampled fps.

The clip's budget: `max_video_tokens` is the checkpoint's own where its video processor's file sets
one, else the model's context (config.json's max_position_embeddings). transformers assumes a context
of 128,000 tokens, the released Qwen2.5-VL checkpoints' own; taking the checkpoint's context gives the
same budget for them and keeps one clip within 90% of a smaller model's context instead of exceeding it.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

from vlm_serving.checkpoint_config import context_tokens, qwen_video_processor_config, read_json
from vlm_serving.encoding.encoder_inputs import ImageInputs, qwen_image_inputs
from vlm_serving.preprocessing.patches import normalization_table, normalize_patches, smart_resize
from vlm_serving.preprocessing.video import VideoError

# transformers' smart_resize refuses frames more elongated than this.
MAX_ASPECT_RATIO = 200
# A clip's budget is this share of max_video_tokens (transformers' and qwen-vl-utils' 0.9).
VIDEO_BUDGET_SHARE = 0.9
# The floor of a frame's capped maximum, in multiples of the minimum (transformers' and qwen-vl-utils' 1.05).
MIN_PIXELS_MARGIN = 1.05


@dataclass(frozen=True)
class QwenVideo:
    """One clip as Qwen2.5-VL's vision tower and language model take it."""

    inputs: ImageInputs  # the encoder's inputs: patches float32 [t*h*w, 3*T*p*p] and index tensors
    grid_thw: np.ndarray  # int64 [3]: temporal patches, patch rows, patch columns
    second_per_grid_t: float  # seconds one temporal patch spans (its 3-D rotary positions' time step)
    token_count: int  # <|video_pad|> tokens the clip takes in the prompt: t*h*w / merge^2
    processed_size: tuple[int, int]  # (width, height) every frame was resized to


@functools.cache
def _torch():
    """torch, imported on the first clip (1 s, and about 190 MiB resident). Imported here first, the
    process is a lean preprocessing one whose requests already run on as many threads as it has cores
    (`image_threads`): torch's own pool is kept to one thread so as not to oversubscribe them."""
    imported_here = "torch" not in sys.modules
    import torch

    if imported_here:
        torch.set_num_threads(1)
    return torch


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [frames, height, width, 3]: uint8 [frames, H, W, 3] resized as torchvision's v2 `resize`
    does on the CPU (bicubic, antialias: torch's uint8 kernel, called directly); the same size is kept
    as is. The kernel takes the frames channels-last, as they are, and computes the same bytes as for the
    channels-first copy transformers hands it (tested), without the transposing copy (2x the resize's time)."""
    if frames.shape[1:3] == (height, width):
        return frames
    torch = _torch()
    resized = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2), size=[height, width],
                                              mode="bicubic", align_corners=False, antialias=True)
    return np.ascontiguousarray(resized.permute(0, 2, 3, 1).numpy())


def stacked_frames(frames: list[Image.Image | np.ndarray]) -> np.ndarray:
    """uint8 [frames, H, W, 3] from upright RGB frames (PIL images or uint8 [H, W, 3] arrays) of one size."""
    if not frames:
        raise ValueError("a clip needs at least one frame")
    pixels = [np.asarray(frame) for frame in frames]
    for index, frame in enumerate(pixels):
        if frame.dtype != np.uint8 or frame.shape != (*pixels[0].shape[:2], 3):
            raise ValueError(f"frame {index}: expected uint8 RGB of {pixels[0].shape[1]}x{pixels[0].shape[0]}, got "
                             f"{frame.dtype} of shape {frame.shape}; frames of a clip share one size")
    return np.stack(pixels)


class QwenVideoProcessor:
    """A checkpoint's video processing; `image_settings` is `image_processor_config(checkpoint, "qwen2_5_vl")`
    (its `vision`: the tower's settings for the encoder's index tensors)."""

    def __init__(self, image_settings: dict[str, Any], checkpoint_dir: str | Path):
        settings = qwen_video_processor_config(checkpoint_dir)
        self.vision_config = SimpleNamespace(**image_settings["vision"])
        self.patch, self.merge, self.temporal = settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
        self.min_pixels, self.max_pixels = settings["min_pixels"], settings["max_pixels"]
        self.max_video_tokens = settings["max_video_tokens"] or context_tokens(read_json(checkpoint_dir, "config.json"))
        # transformers' fused rescale + normalize for videos: mean and std scaled by 1 / rescale_factor
        # in float32, then (x - mean) / std in float32.
        scale = np.float32(1.0 / settings["rescale_factor"])
        self.table = normalization_table(1.0, np.asarray(settings["image_mean"], np.float32) * scale,
                                         np.asarray(settings["image_std"], np.float32) * scale)

    def frame_max_pixels(self, frames: int) -> int:
        """A frame's largest pixel count in a clip of `frames`: the checkpoint's maximum, capped at an
        even share of the clip's budget, never below the minimum plus 5% (`cap_pixels_per_frame=True`)."""
        factor = self.patch * self.merge
        budget = int(self.max_video_tokens * factor * factor * VIDEO_BUDGET_SHARE)
        return max(min(self.max_pixels, budget * self.temporal // frames), int(self.min_pixels * MIN_PIXELS_MARGIN))

    def frame_size(self, frames: int, width: int, height: int, index: int = 0) -> tuple[int, int]:
        """(height, width) each of a clip's `frames` upright `width` x `height` frames is resized to.
        `index` only names the video in errors ("video 1: ...")."""
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise VideoError(f"video {index}: frames of {width}x{height} are over Qwen2.5-VL's aspect ratio limit "
                             f"of {MAX_ASPECT_RATIO}:1; crop or pad the video")
        return smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.frame_max_pixels(frames))

    def token_count(self, frames: int, width: int, height: int, index: int = 0) -> int:
        """The <|video_pad|> tokens a clip of `frames` upright `width` x `height` frames takes: known from
        the container's header, before any frame is decoded."""
        resized_height, resized_width = self.frame_size(frames, width, height, index)
        temporal_patches = math.ceil(frames / self.temporal)
        return temporal_patches * (resized_height // self.patch) * (resized_width // self.patch) // self.merge**2

    def process(self, frames: list[Image.Image | np.ndarray], sampling_fps: float, index: int = 0) -> QwenVideo:
        """The clip's tensors from its sampled frames (upright RGB, one size, in time order) and the rate
        they were sampled at (frames per second)."""
        if not sampling_fps > 0 or not math.isfinite(sampling_fps):
            raise ValueError(f"sampling_fps {sampling_fps} must be a positive number of frames per second")
        pixels = stacked_frames(frames)
        height, width = self.frame_size(len(frames), pixels.shape[2], pixels.shape[1], index)
        resized = resize_frames(pixels, height, width)
        if pad := -len(resized) % self.temporal:  # the last frame repeated, as transformers' patchify pads
            resized = np.concatenate([resized, np.repeat(resized[-1:], pad, axis=0)])
        p, m, t = self.patch, self.merge, self.temporal
        grid = np.array([len(resized) // t, height // p, width // p], dtype=np.int64)
        blocks = resized.reshape(grid[0], t, grid[1] // m, m, p, grid[2] // m, m, p, 3)
        # -> [time, merge-block row, merge-block col, row in block, col in block, channel, frame, y, x]; the
        # copy (one byte a value) lets each patch's frames be one run of rows for `normalize_patches`.
        blocks = np.ascontiguousarray(blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)).reshape(-1, 3, t * p, p)
        patches = np.empty((len(blocks), 3, 1, t * p, p), dtype=np.float32)
        normalize_patches(blocks, self.table, patches)
        return QwenVideo(
            inputs=qwen_image_inputs(patches.reshape(len(blocks), -1), grid, self.vision_config),
            grid_thw=grid,
            second_per_grid_t=self.temporal / sampling_fps,
            token_count=int(grid.prod()) // m**2,
            processed_size=(width, height),
        )
