"""Per-family preprocessing: encoded images and video clips + chat messages -> token ids and the
encoder's inputs.

Each family reproduces its transformers processor exactly (same resize, same float32 arithmetic,
same placeholder expansion), only faster: normalization is a per-channel lookup table on the uint8
pixels, fused with patchify in one cache-sized pass (`patches.normalize_patches`), a picture already at its
target size is not resampled, the images of a request are processed on as many threads as the process
has cores, and image placeholders are expanded in token ids rather than by tokenizing a string with
thousands of repeated placeholder tokens. Each image also gets the index tensors its vision encoder
graph takes (`vlm_serving.encoding.encoder_inputs`), so the encoder is pure tensor work.

A clip is sampled into frames (`video.py`); Qwen2.5-VL reads them as its native video input
(`qwen_video.py`: one encoder input per clip, `<|video_pad|>` tokens, its grid and timing for the
3-D positions), Pixtral as images (`videos_as_frames`). Images and clips keep their reading order.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

from vlm_serving.checkpoint_config import context_tokens, image_processor_config, read_json
from vlm_serving.preprocessing.chat import (count_images, media_parts, parse_messages, template_messages, video_parts,
                                            videos_as_frames)
from vlm_serving.encoding.encoder_inputs import ImageInputs, pixtral_image_inputs, qwen_image_inputs
from vlm_serving.preprocessing.image_kind import ImageKind, classify
from vlm_serving.preprocessing.images import ImageError, ImageLimits, decode_image, upright_size
from vlm_serving.tasks import apply_task
from vlm_serving.preprocessing.patches import normalization_table, normalize_patches, smart_resize
from vlm_serving.preprocessing.prompt import PromptTokenizer
from vlm_serving.preprocessing.qwen_video import QwenVideoProcessor
from vlm_serving.preprocessing.resolution import ImageDetail, PixelRange, ResolutionPresets
from vlm_serving.preprocessing.video import SampledVideo, VideoError, VideoInfo, VideoLimits, decode_video, probe_sampling

FAMILIES = ("qwen2_5_vl", "pixtral")
# The tokens a clip's frames share when a family reads them as images (Pixtral): 16,384 tokens take
# 32 frames at about 360x360 pixels each.
VIDEO_CLIP_TOKENS = 16384


@dataclass
class PreprocessedRequest:
    """What one request becomes: prompt token ids, each image's encoder inputs, and what else the
    language model needs about the images (Qwen2.5-VL: `image_grid_thw`, for its 3-D positions)."""

    input_ids: np.ndarray  # int64 [prompt_len]
    images: list[ImageInputs] = field(default_factory=list)
    language_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    image_tokens: int = 0
    # Per image: its kind and the (width, height) in pixels it was processed at.
    image_kinds: list[ImageKind] = field(default_factory=list)
    processed_sizes: list[tuple[int, int]] = field(default_factory=list)
    # Per video: the frames sampled from it.
    video_frames: list[int] = field(default_factory=list)

    def image_info_json(self) -> str:
        """Per image {"kind", "width", "height"}: what the answer reports of how it saw each image."""
        return json.dumps([{"kind": kind.value, "width": width, "height": height}
                           for kind, (width, height) in zip(self.image_kinds, self.processed_sizes)])


def resized_pixels(picture: Image.Image, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: `picture` resized as transformers' processors resize it (Pillow's
    bicubic). A picture already at that size is used as it is: Pillow would return a copy of it."""
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(picture)


def image_threads(max_images: int, instances: int = 1) -> int:
    """Threads for the images of a request: the cores this process may run on (its CPU affinity,
    which taskset and container cpusets set, not the machine's count) shared among the model's
    `instances` (each a process: instances x threads ~ cores), at least one, at most one per image."""
    return max(1, min(max_images, len(os.sched_getaffinity(0)) // instances))


@dataclass(frozen=True)
class Clip:
    """One video of a request as its container's header describes it, and how it is to be sampled."""

    index: int  # among the request's videos, for errors ("video 1: ...")
    data: bytes
    fps: float
    max_frames: int
    info: VideoInfo
    frames: int  # how many frames sampling takes, known before decoding

    @classmethod
    def probe(cls, index: int, data: bytes, part: dict, limits: VideoLimits) -> "Clip":
        if part["max_frames"] > limits.max_frames:
            raise VideoError(f"video {index}: max_frames {part['max_frames']} is over the limit of "
                             f"{limits.max_frames} frames per clip; ask for {limits.max_frames} or fewer")
        info, frames = probe_sampling(data, part["fps"], part["max_frames"], limits, index)
        return cls(index, data, part["fps"], part["max_frames"], info, frames)

    def decode(self, limits: VideoLimits) -> SampledVideo:
        return decode_video(self.data, self.fps, self.max_frames, limits, index=self.index)


class FamilyPreprocessor:
    """Shared flow; subclasses define the image and video tensors and the placeholder expansion."""

    family: str

    def __init__(self, checkpoint_dir: str | Path, limits: ImageLimits = ImageLimits(), max_images: int = 16,
                 threads: int | None = None, max_request_pixels: int = 64_000_000,
                 presets: ResolutionPresets = ResolutionPresets(), video_limits: VideoLimits = VideoLimits(),
                 max_videos: int = 4):
        self.checkpoint_dir = Path(checkpoint_dir)
        # Decoding, resizing and normalizing release the GIL: the images of a request are processed in parallel.
        self.pool = ThreadPoolExecutor(threads or image_threads(max_images))
        self.limits = limits
        self.max_images = max_images
        self.video_limits = video_limits
        self.max_videos = max_videos
        self.max_request_pixels = max_request_pixels
        self.presets = presets
        # Read from the checkpoint's JSON files and tokenizer.json: no transformers (nor torch) in this process.
        self.max_context = context_tokens(read_json(self.checkpoint_dir, "config.json"))
        self.tokenizer = PromptTokenizer.from_checkpoint(self.checkpoint_dir)
        self.image_settings = settings = image_processor_config(self.checkpoint_dir, self.family)
        self.table = normalization_table(settings["rescale_factor"], settings["image_mean"], settings["image_std"])

    def __call__(self, encoded_images: list[bytes], messages_json: bytes | str, max_tokens: int | None = None,
                 detail: ImageDetail | None = None, task: str | None = None,
                 tools: list[dict] = (), encoded_videos: list[bytes] = ()) -> PreprocessedRequest:
        """The request's tensors, each image processed at the pixel range its kind and `detail` give
        (None: the model's default detail). Before any image is decoded, the headers alone decide
        whether the request can fit: pixels per request, and prompt + the fewest image tokens the
        images can take + `max_tokens` (unset: one token at least) within the context; after the
        images are classified, the exact count is checked again. `task` (vlm_serving/tasks.py): its
        instruction, in this family's conventions, replaces the last user turn's text; `tools`
        (vlm_serving/tools.py, as functions): written into the system turn in this family's convention.
        Videos: each clip's header gives its frame count and size, so its tokens count in the same
        checks before anything is decoded."""
        messages = parse_messages(messages_json)
        if task:
            messages = apply_task(messages, task, self.family)
        expected = count_images(messages)
        if expected != len(encoded_images):
            raise ImageError(
                f"messages hold {expected} image part(s) but {len(encoded_images)} image(s) were sent; "
                "send one encoded image per {'type': 'image'} part, in order"
            )
        if len(encoded_images) > self.max_images:
            raise ImageError(f"{len(encoded_images)} images is over the limit of {self.max_images} per request")
        parts = video_parts(messages)
        if len(parts) != len(encoded_videos):
            raise VideoError(
                f"messages hold {len(parts)} video part(s) but {len(encoded_videos)} video(s) were sent; "
                "send one encoded clip per {'type': 'video'} part, in order"
            )
        if len(encoded_videos) > self.max_videos:
            raise VideoError(f"{len(encoded_videos)} videos is over the limit of {self.max_videos} per request")
        media_order = [part["type"] for part in media_parts(messages)]
        clips = [Clip.probe(k, data, part, self.video_limits) for k, (data, part) in enumerate(zip(encoded_videos, parts))]
        messages = template_messages(self.with_video_placeholders(messages, clips), self.family, list(tools))
        sizes = [upright_size(data, self.limits, index=i) for i, data in enumerate(encoded_images)]
        pixels = sum(width * height for width, height in sizes)
        if pixels > self.max_request_pixels:
            raise ImageError(f"the request's images hold {pixels} pixels in all, over the limit of "
                             f"{self.max_request_pixels} per request; send fewer or smaller images")
        ids = np.asarray(self.tokenizer.prompt_ids(messages), dtype=np.int64)
        fewest = min((self.presets.range_for(kind, detail) for kind in ImageKind), key=lambda r: r.max_pixels)
        clip_tokens = [self.clip_token_count(clip.frames, clip.info.width, clip.info.height, clip.index, detail)
                       for clip in clips]
        self._check_context(ids, [self.image_token_count(w, h, i, fewest) for i, (w, h) in enumerate(sizes)],
                            clip_tokens, [clip.frames for clip in clips], max_tokens)
        # Decode every image and clip before any resize: a bad one fails the request early.
        pictures = self.map(lambda i: decode_image(encoded_images[i], self.limits, index=i), range(len(encoded_images)))
        sampled = self.map(lambda clip: clip.decode(self.video_limits), clips)
        kinds = self.map(classify, pictures)
        ranges = [self.presets.range_for(kind, detail) for kind in kinds]
        clip_tokens = [self.clip_token_count(len(video.frames), video.frames[0].width, video.frames[0].height, k, detail)
                       for k, video in enumerate(sampled)]
        self._check_context(ids, [self.image_token_count(w, h, i, r) for i, ((w, h), r) in enumerate(zip(sizes, ranges))],
                            clip_tokens, [len(video.frames) for video in sampled], max_tokens)
        result = self.build(pictures, ids, ranges, sampled, media_order, detail)
        result.image_kinds = kinds
        result.video_frames = [len(video.frames) for video in sampled]
        return result

    def _check_context(self, ids: np.ndarray, image_tokens: list[int], clip_tokens: list[int], clip_frames: list[int],
                       max_tokens: int | None) -> None:
        # Each image's placeholder is replaced by its tokens, and each clip's by its frames'.
        placeholders = len(image_tokens) + sum(map(self.clip_placeholders, clip_frames))
        text_tokens = len(ids) - placeholders
        prompt = text_tokens + sum(image_tokens) + sum(clip_tokens)
        media = f"{sum(image_tokens)} image tokens ({', '.join(map(str, image_tokens)) or 'no images'})"
        if clip_tokens:
            media += f" + {sum(clip_tokens)} video tokens ({', '.join(map(str, clip_tokens))})"
        smaller = ("send fewer or smaller images" + (", shorter clips or a lower fps or max_frames" if clip_tokens else "")
                   + ", a lower detail")
        if max_tokens is None and prompt >= self.max_context:
            raise ImageError(
                f"the prompt's {text_tokens} text tokens + {media} = {prompt} tokens leave no room for an answer "
                f"in the model's context of {self.max_context}; {smaller} or a shorter prompt"
            )
        needed = prompt + (max_tokens or 0)
        if needed > self.max_context:
            raise ImageError(
                f"the prompt's {text_tokens} text tokens + {media} + max_tokens {max_tokens} = {needed} tokens "
                f"exceed the model's context of {self.max_context}; {smaller}, a shorter prompt or a lower max_tokens"
            )

    def with_video_placeholders(self, messages: list[dict], clips: list[Clip]) -> list[dict]:
        """The messages as this family's template is to render the clips in them."""
        raise NotImplementedError

    def clip_token_count(self, frames: int, width: int, height: int, index: int, detail: ImageDetail | None) -> int:
        """The tokens a clip of `frames` sampled frames of `width` x `height` (upright) takes in the prompt."""
        raise NotImplementedError

    def clip_placeholders(self, frames: int) -> int:
        """How many placeholder tokens the template wrote for a clip of `frames` sampled frames."""
        raise NotImplementedError

    def image_token_count(self, width: int, height: int, index: int, pixels: PixelRange) -> int:
        """The tokens an upright `width` x `height` image takes in the prompt at `pixels`."""
        raise NotImplementedError

    def checkpoint_range(self) -> PixelRange:
        """The range the checkpoint's own image processor resizes into (its defaults)."""
        raise NotImplementedError

    def transformers_size(self, pixels: PixelRange) -> dict:
        """The `size` argument that makes transformers' image processor resize as `pixels` does here."""
        raise NotImplementedError

    def build(self, pictures: list[Image.Image], prompt_ids: np.ndarray, ranges: list[PixelRange],
              videos: list[SampledVideo] = (), media_order: list[str] | None = None,
              detail: ImageDetail | None = None) -> PreprocessedRequest:
        """`media_order`: "image" or "video" for each media part, in reading order (None: images only)."""
        raise NotImplementedError

    def map(self, function, items) -> list:
        items = list(items)
        return [function(item) for item in items] if len(items) < 2 else list(self.pool.map(function, items))

    def _expand(self, prompt_ids: np.ndarray, placeholder_id: int, expansions: list[np.ndarray]) -> np.ndarray:
        """Replace the k-th placeholder token by expansions[k]."""
        positions = np.flatnonzero(prompt_ids == placeholder_id)
        if len(positions) != len(expansions):
            raise ImageError(
                f"the chat template produced {len(positions)} image placeholder(s) for {len(expansions)} image(s)"
            )
        pieces, start = [], 0
        for position, expansion in zip(positions, expansions):
            pieces += [prompt_ids[start:position], expansion]
            start = position + 1
        pieces.append(prompt_ids[start:])
        return np.concatenate(pieces).astype(np.int64)


class Qwen2_5_VLPreprocessor(FamilyPreprocessor):
    """Per image: patches float32 [patches, 3*T*p*p] + index tensors; image_grid_thw int64 [images, 3]."""

    family = "qwen2_5_vl"

    def __init__(self, checkpoint_dir: str | Path, **kwargs: Any):
        super().__init__(checkpoint_dir, **kwargs)
        settings = self.image_settings
        self.vision_config = SimpleNamespace(**settings["vision"])
        self.patch, self.merge, self.temporal = settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
        # The checkpoint's bounds.
        self.min_pixels, self.max_pixels = settings["min_pixels"], settings["max_pixels"]
        self.image_pad_id = self.tokenizer.token_id("<|image_pad|>")
        self.video_pad_id = self.tokenizer.token_id("<|video_pad|>")
        self.video = QwenVideoProcessor(settings, self.checkpoint_dir)

    def processing_size(self, width: int, height: int, pixels: PixelRange) -> tuple[int, int]:
        """(height, width) an image is resized to: `pixels` within the checkpoint's bounds."""
        bounds = pixels.clamped(self.min_pixels, self.max_pixels)
        return smart_resize(height, width, self.patch * self.merge, bounds.min_pixels, bounds.max_pixels)

    def checkpoint_range(self) -> PixelRange:
        return PixelRange(self.min_pixels, self.max_pixels)

    def transformers_size(self, pixels: PixelRange) -> dict:
        bounds = pixels.clamped(self.min_pixels, self.max_pixels)
        return {"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels}

    def patchify(self, picture: Image.Image, pixels: PixelRange) -> tuple[np.ndarray, np.ndarray]:
        height, width = self.processing_size(picture.width, picture.height, pixels)
        resized = resized_pixels(picture, width, height)
        p, m = self.patch, self.merge
        grid_h, grid_w = height // p, width // p
        blocks = resized.reshape(grid_h // m, m, p, grid_w // m, m, p, 3)
        # -> [merge-block row, merge-block col, row in block, col in block, channel, py, px], a view
        blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
        # A still image fills every temporal slot of the patch with the same frame.
        patches = np.empty((*blocks.shape[:5], self.temporal, p, p), dtype=np.float32)
        normalize_patches(blocks, self.table, patches)
        return patches.reshape(grid_h * grid_w, -1), np.array([1, grid_h, grid_w], dtype=np.int64)

    def image_token_count(self, width: int, height: int, index: int, pixels: PixelRange) -> int:
        height, width = self.processing_size(width, height, pixels)
        return (height // self.patch) * (width // self.patch) // self.merge**2

    # A clip is its template's one <|video_pad|>, expanded like an image's <|image_pad|>.
    def with_video_placeholders(self, messages: list[dict], clips: list[Clip]) -> list[dict]:
        return messages

    def clip_placeholders(self, frames: int) -> int:
        return 1

    def clip_token_count(self, frames: int, width: int, height: int, index: int, detail: ImageDetail | None) -> int:
        return self.video.token_count(frames, width, height, index)

    def build(self, pictures: list[Image.Image], prompt_ids: np.ndarray, ranges: list[PixelRange],
              videos: list[SampledVideo] = (), media_order: list[str] | None = None,
              detail: ImageDetail | None = None) -> PreprocessedRequest:
        results = self.map(lambda item: self.patchify(*item), list(zip(pictures, ranges)))
        clips = self.map(lambda item: self.video.process(item[1].frames, item[1].sampling_fps, item[0]), list(enumerate(videos)))
        grids = np.stack([grid for _, grid in results]) if results else np.zeros((0, 3), dtype=np.int64)
        video_grids = np.stack([clip.grid_thw for clip in clips]) if clips else np.zeros((0, 3), dtype=np.int64)
        counts = [int(grid.prod()) // self.merge**2 for grid in grids]
        video_counts = [int(grid.prod()) // self.merge**2 for grid in video_grids]
        # The encoder's inputs in reading order: the embed step's rows fill the prompt's image and video
        # tokens in the order they come.
        image_inputs = iter([qwen_image_inputs(patches, grid, self.vision_config) for patches, grid in results])
        clip_inputs = iter([clip.inputs for clip in clips])
        inputs = [next(image_inputs) if kind == "image" else next(clip_inputs)
                  for kind in media_order or ["image"] * len(pictures)]
        ids = self._expand(prompt_ids, self.image_pad_id, [np.full(n, self.image_pad_id, dtype=np.int64) for n in counts])
        ids = self._expand(ids, self.video_pad_id, [np.full(n, self.video_pad_id, dtype=np.int64) for n in video_counts])
        return PreprocessedRequest(
            input_ids=ids,
            images=inputs,
            language_tensors={
                "image_grid_thw": grids,
                "video_grid_thw": video_grids,
                "second_per_grid_ts": np.array([clip.second_per_grid_t for clip in clips], dtype=np.float32),
            },
            image_tokens=sum(counts) + sum(video_counts),
            processed_sizes=[(int(grid[2]) * self.patch, int(grid[1]) * self.patch) for grid in grids],
        )


class PixtralPreprocessor(FamilyPreprocessor):
    """Per image: its 16x16 patches, row-major, each flattened channel-major (float32 [patches, 3*p*p]),
    + positions; the language model needs nothing else about the images."""

    family = "pixtral"

    def __init__(self, checkpoint_dir: str | Path, **kwargs: Any):
        super().__init__(checkpoint_dir, **kwargs)
        self.patch, self.longest_edge = self.image_settings["patch_size"], self.image_settings["longest_edge"]
        # PixtralProcessor's settings (merge size, placeholder names), where the checkpoint has them.
        path = self.checkpoint_dir / "processor_config.json"
        settings = json.loads(path.read_text()) if path.is_file() else {}
        self.merge = int(settings.get("spatial_merge_size", 1))
        token = self.tokenizer.token_id
        self.image_id = token(settings.get("image_token", "[IMG]"))
        self.break_id = token(settings.get("image_break_token", "[IMG_BREAK]"))
        self.end_id = token(settings.get("image_end_token", "[IMG_END]"))

    def longest_edge_for(self, pixels: PixelRange) -> int:
        """Pixtral only scales down, to a longest edge: the side of the range's largest square,
        within the checkpoint's own longest edge."""
        return min(math.isqrt(pixels.max_pixels), self.longest_edge)

    def checkpoint_range(self) -> PixelRange:
        return PixelRange(1, self.longest_edge**2)

    def transformers_size(self, pixels: PixelRange) -> dict:
        return {"longest_edge": self.longest_edge_for(pixels)}

    def target_size(self, height: int, width: int, longest_edge: int) -> tuple[int, int]:
        ratio = max(height / longest_edge, width / longest_edge)
        if ratio > 1:
            height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
        return ((height - 1) // self.patch + 1) * self.patch, ((width - 1) // self.patch + 1) * self.patch

    def placeholder_ids(self, height: int, width: int) -> np.ndarray:
        rows, cols = height // (self.patch * self.merge), width // (self.patch * self.merge)
        grid = np.full((rows, cols + 1), self.image_id, dtype=np.int64)
        grid[:, -1] = self.break_id
        grid[-1, -1] = self.end_id
        return grid.reshape(-1)

    def patchify(self, picture: Image.Image, size: tuple[int, int]) -> ImageInputs:
        height, width = size
        resized = resized_pixels(picture, width, height)
        p, rows, cols = self.patch, height // self.patch, width // self.patch
        # -> [patch row, patch col, channel, py, px], a view
        blocks = resized.reshape(rows, p, cols, p, 3).transpose(0, 2, 4, 1, 3)
        patches = np.empty((rows, cols, 3, 1, p, p), dtype=np.float32)  # one temporal slot
        normalize_patches(blocks, self.table, patches)
        return pixtral_image_inputs(patches.reshape(rows * cols, -1), rows, cols)

    def checked_target_size(self, width: int, height: int, index: int, pixels: PixelRange) -> tuple[int, int]:
        longest_edge = self.longest_edge_for(pixels)
        target_height, target_width = self.target_size(height, width, longest_edge)
        if target_height == 0 or target_width == 0:  # transformers' processor fails on these too
            raise ImageError(
                f"image {index}: {width}x{height} scaled to a longest edge of {longest_edge} pixels "
                "leaves its short side no pixel; pad it towards a squarer shape"
            )
        return target_height, target_width

    def image_token_count(self, width: int, height: int, index: int, pixels: PixelRange) -> int:
        return len(self.placeholder_ids(*self.checked_target_size(width, height, index, pixels)))

    # Pixtral has no video input: a clip's sampled frames are images, in time order, each at an even
    # share of the clip's token budget (as qwen-vl-utils bounds a clip for Qwen2.5-VL), never above the
    # photo preset of the request's detail.
    def with_video_placeholders(self, messages: list[dict], clips: list[Clip]) -> list[dict]:
        return videos_as_frames(messages, [clip.frames for clip in clips])

    def clip_placeholders(self, frames: int) -> int:
        return frames

    def frame_range(self, frames: int, detail: ImageDetail | None) -> PixelRange:
        photo = self.presets.range_for(ImageKind.PHOTO, detail)
        share = VIDEO_CLIP_TOKENS * (self.patch * self.merge) ** 2 // frames
        return PixelRange(1, max((self.patch * self.merge) ** 2, min(photo.max_pixels, share)))

    def clip_token_count(self, frames: int, width: int, height: int, index: int, detail: ImageDetail | None) -> int:
        return frames * self.image_token_count(width, height, index, self.frame_range(frames, detail))

    def build(self, pictures: list[Image.Image], prompt_ids: np.ndarray, ranges: list[PixelRange],
              videos: list[SampledVideo] = (), media_order: list[str] | None = None,
              detail: ImageDetail | None = None) -> PreprocessedRequest:
        # Every picture in reading order with its pixel range, a clip's frames in its place.
        images, clips = iter(zip(pictures, ranges)), iter(videos)
        ordered, is_image = [], []
        for kind in media_order or ["image"] * len(pictures):
            if kind == "image":
                ordered.append(next(images))
                is_image.append(True)
            else:
                video = next(clips)
                frame_range = self.frame_range(len(video.frames), detail)
                ordered += [(frame, frame_range) for frame in video.frames]
                is_image += [False] * len(video.frames)
        sizes = [self.checked_target_size(picture.width, picture.height, index, pixels)
                 for index, (picture, pixels) in enumerate(ordered)]
        expansions = [self.placeholder_ids(h, w) for h, w in sizes]
        return PreprocessedRequest(
            input_ids=self._expand(prompt_ids, self.image_id, expansions),
            images=self.map(lambda item: self.patchify(item[0][0], item[1]), list(zip(ordered, sizes))),
            image_tokens=sum(len(expansion) for expansion in expansions),
            processed_sizes=[(w, h) for (h, w), image in zip(sizes, is_image) if image],
        )


def load_preprocessor(family: str, checkpoint_dir: str | Path, **kwargs: Any) -> FamilyPreprocessor:
    classes = {cls.family: cls for cls in (Qwen2_5_VLPreprocessor, PixtralPreprocessor)}
    if family not in classes:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return classes[family](checkpoint_dir, **kwargs)
