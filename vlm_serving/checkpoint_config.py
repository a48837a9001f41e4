"""A checkpoint's settings read from its JSON files, with transformers' defaults where a file leaves one
out: for the processes that never import transformers (preprocessing, the renderer and the router that
imports it). transformers' AutoConfig and AutoImageProcessor read the same files; the tests check that
both readings agree (tests/unit/test_lean_preprocessing.py), for the tiny checkpoints and for files
written the way released checkpoints write them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# transformers' defaults (5.24) for what a file may leave out: the text models' context
# (Qwen2_5_VLTextConfig, MistralConfig: `save_pretrained` drops values equal to them), Qwen2.5-VL's
# vision tower (Qwen2_5_VLVisionConfig) and both image processors (Qwen2VLImageProcessor,
# PixtralImageProcessor: OpenAI CLIP's mean and std, rescale by 1/255).
DEFAULT_CONTEXT_TOKENS = {"qwen2_5_vl": 32768, "qwen2_5_vl_text": 32768, "mistral": 131072}
QWEN_VISION_DEFAULTS = {"spatial_merge_size": 2, "window_size": 112, "patch_size": 14}
CLIP_NORMALIZATION = {"rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711]}
QWEN_PROCESSOR_DEFAULTS = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                           "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}}
PIXTRAL_PROCESSOR_DEFAULTS = {"patch_size": {"height": 16, "width": 16}, "size": {"longest_edge": 1024}}
# Qwen2VLVideoProcessor's own defaults (its bounds differ from the image processor's).
QWEN_VIDEO_PROCESSOR_DEFAULTS = {**QWEN_PROCESSOR_DEFAULTS, "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}}


def read_json(checkpoint_dir: str | Path, name: str) -> dict[str, Any]:
    path = Path(checkpoint_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a checkpoint folder holds its {name} (build the tiny ones with "
                                "`make models`, or point the model's `checkpoint` parameter at real weights)")
    return json.loads(path.read_text())


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's settings: `text_config`, or the top level where a checkpoint writes them flat
    (released Qwen2.5-VL checkpoints do)."""
    return config.get("text_config") or config


def context_tokens(config: dict[str, Any]) -> int:
    """The most tokens (prompt, image and generated together) one sequence may hold: the text model's
    `max_position_embeddings`, as transformers' config reads it from config.json."""
    text = text_config(config)
    if "max_position_embeddings" in text:
        return int(text["max_position_embeddings"])
    kind = text.get("model_type", config.get("model_type"))
    if kind not in DEFAULT_CONTEXT_TOKENS:
        raise ValueError(f"config.json: the text model ({kind}) gives no max_position_embeddings; add it")
    return DEFAULT_CONTEXT_TOKENS[kind]


def checkpoint_context_tokens(checkpoint_dir: str | Path) -> int:
    """`context_tokens` of a checkpoint folder; 0 where it has no config.json (yet)."""
    if not (Path(checkpoint_dir) / "config.json").is_file():
        return 0
    return context_tokens(read_json(checkpoint_dir, "config.json"))


def image_processor_config(checkpoint_dir: str | Path, family: str) -> dict[str, Any]:
    """What preprocessing needs of the checkpoint's image processor (preprocessor_config.json), as
    transformers' processor of the family reads it: rescale_factor, image_mean and image_std, and
    - qwen2_5_vl: patch_size, merge_size, temporal_patch_size, min_pixels and max_pixels (the file's
      `min_pixels`/`max_pixels` override its `size`, as transformers' processor does), and `vision`,
      the vision tower's spatial_merge_size, window_size and patch_size (config.json);
    - pixtral: patch_size (one side of the square patch) and longest_edge.
    """
    settings = read_json(checkpoint_dir, "preprocessor_config.json")
    out = {key: settings.get(key, default) for key, default in CLIP_NORMALIZATION.items()}
    if family == "qwen2_5_vl":
        out.update({key: int(settings.get(key, QWEN_PROCESSOR_DEFAULTS[key]))
                    for key in ("patch_size", "merge_size", "temporal_patch_size")})
        size = settings.get("size") or QWEN_PROCESSOR_DEFAULTS["size"]
        out["min_pixels"] = int(settings.get("min_pixels") or size["shortest_edge"])
        out["max_pixels"] = int(settings.get("max_pixels") or size["longest_edge"])
        vision = read_json(checkpoint_dir, "config.json").get("vision_config", {})
        out["vision"] = {key: int(vision.get(key, default)) for key, default in QWEN_VISION_DEFAULTS.items()}
    elif family == "pixtral":
        patch = settings.get("patch_size", PIXTRAL_PROCESSOR_DEFAULTS["patch_size"])
        out["patch_size"] = int(patch if isinstance(patch, int) else patch["height"])
        out["longest_edge"] = int((settings.get("size") or PIXTRAL_PROCESSOR_DEFAULTS["size"])["longest_edge"])
    else:
        raise ValueError(f"unknown model family {family!r}")
    return out


def qwen_video_processor_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """What preprocessing needs of a Qwen2.5-VL checkpoint's video processor, from the file transformers'
    AutoVideoProcessor reads it from: processor_config.json's "video_processor", else
    video_preprocessor_config.json, else preprocessor_config.json (a checkpoint without video settings
    gives its video processor the image processor's file). rescale_factor, image_mean, image_std,
    patch_size, merge_size, temporal_patch_size, min_pixels and max_pixels (a frame's bounds: `size`,
    overridden by `min_pixels`/`max_pixels`), and max_video_tokens (None where the file sets none).
    """
    checkpoint_dir = Path(checkpoint_dir)
    nested = checkpoint_dir / "processor_config.json"
    settings = json.loads(nested.read_text()).get("video_processor") if nested.is_file() else None
    if settings is None:
        name = "video_preprocessor_config.json"
        settings = read_json(checkpoint_dir, name if (checkpoint_dir / name).is_file() else "preprocessor_config.json")
    out = {key: settings.get(key, default) for key, default in CLIP_NORMALIZATION.items()}
    out.update({key: int(settings.get(key, QWEN_VIDEO_PROCESSOR_DEFAULTS[key]))
                for key in ("patch_size", "merge_size", "temporal_patch_size")})
    size = dict(settings.get("size") or QWEN_VIDEO_PROCESSOR_DEFAULTS["size"])
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if settings.get(key) is not None:
            size[edge] = settings[key]
        if not size.get(edge):
            raise ValueError(f"{checkpoint_dir}: the video processor's size gives no {edge}; add it (pixels a frame)")
    out["min_pixels"], out["max_pixels"] = int(size["shortest_edge"]), int(size["longest_edge"])
    tokens = settings.get("max_video_tokens")
    out["max_video_tokens"] = int(tokens) if tokens is not None else None
    return out
