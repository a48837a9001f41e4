"""Faster preprocessing (issue 26): the fused normalize + patchify pass, the resize skipped for a picture
already at its target size, the image thread pool sized to the process's cores, and a lone image's
patches packed without a copy. The patches equal transformers' image processors value for value
(max |diff| 0) at odd sizes, at every resolution preset, and across the fused pass's step boundaries."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from tests.conftest import FAMILIES, picture
from vlm_serving.encoding.encoder_inputs import SPECS, pack, unpack
from vlm_serving.preprocessing import patches
from vlm_serving.preprocessing.image_kind import ImageKind
from vlm_serving.preprocessing.preprocess import load_preprocessor
from vlm_serving.tiny_checkpoints import with_real_image_limits

# Upscaled, odd, extreme aspects, and large enough for many steps of the fused pass with a short last one.
SIZES = [(13, 9), (97, 64), (40, 700), (700, 40), (1031, 617), (1600, 1200)]


@pytest.fixture(scope="module", params=[(family, limits) for family in FAMILIES for limits in ("tiny", "real")],
                ids=lambda param: f"{param[0]}-{param[1]}-limits")
def checkpoint(request, checkpoints, tmp_path_factory):
    family, limits = request.param
    if limits == "tiny":
        return family, checkpoints / family
    return family, with_real_image_limits(checkpoints / family, tmp_path_factory.mktemp("real") / family, family)


def max_difference(family: str, preprocessor, pictures: list[Image.Image], kind: ImageKind) -> float:
    """max |ours - transformers'| over every patch value of `pictures` processed at `kind`'s preset."""
    pixels = preprocessor.presets.range_for(kind, None)
    placeholder = preprocessor.image_pad_id if family == "qwen2_5_vl" else preprocessor.image_id
    ours = preprocessor.build(pictures, np.array([placeholder] * len(pictures)), [pixels] * len(pictures))
    processor = AutoImageProcessor.from_pretrained(preprocessor.checkpoint_dir, local_files_only=True)
    reference = processor(pictures, size=preprocessor.transformers_size(pixels), return_tensors="np")
    if family == "qwen2_5_vl":
        assert np.array_equal(ours.language_tensors["image_grid_thw"], reference["image_grid_thw"])
        mine = np.concatenate([image["pixel_values"] for image in ours.images])
        assert mine.shape == reference["pixel_values"].shape
        return float(np.abs(mine - reference["pixel_values"]).max())
    worst = 0.0
    for image, padded, (height, width) in zip(ours.images, reference["pixel_values"], reference["image_sizes"]):
        rows, cols = height // 16, width // 16
        patches = padded[:, :height, :width].reshape(3, rows, 16, cols, 16).transpose(1, 3, 0, 2, 4).reshape(rows * cols, -1)
        assert image["pixel_values"].shape == patches.shape
        worst = max(worst, float(np.abs(image["pixel_values"] - patches).max()))
    return worst


@pytest.mark.parametrize("kind", list(ImageKind), ids=lambda kind: kind.value)
def test_patches_equal_transformers_at_odd_sizes_and_every_preset(checkpoint, kind):
    family, path = checkpoint
    preprocessor = load_preprocessor(family, path)
    pictures = [picture(width, height, seed=width) for width, height in SIZES]
    assert max_difference(family, preprocessor, pictures, kind) == 0.0


@pytest.mark.parametrize("step_values", [1, 1000, 4097])
def test_patches_equal_transformers_across_every_step_boundary(checkpoints, monkeypatch, step_values):
    """Steps of one row of patches, of a few rows, and of rows that do not divide the picture."""
    monkeypatch.setattr(patches, "NORMALIZE_STEP_VALUES", step_values)
    for family in FAMILIES:
        preprocessor = load_preprocessor(family, checkpoints / family)
        pictures = [picture(331, 517, seed=1), picture(640, 480, seed=2)]
        assert max_difference(family, preprocessor, pictures, ImageKind.PHOTO) == 0.0


# (family, picture size): already at its target size at the photo preset with the real limits
# (Qwen2.5-VL: sides multiples of 28 and pixels within [256², 768²]; Pixtral: sides multiples of 16
# within the longest edge of 768).
AT_TARGET = [("qwen2_5_vl", (560, 420)), ("pixtral", (640, 480))]


@pytest.mark.parametrize("family,size", AT_TARGET, ids=[family for family, _ in AT_TARGET])
def test_a_picture_at_its_target_size_is_not_resampled_and_equals_transformers(checkpoints, tmp_path, monkeypatch,
                                                                                family, size):
    preprocessor = load_preprocessor(family, with_real_image_limits(checkpoints / family, tmp_path / family, family))
    source = picture(*size, seed=3)
    resampled = []
    resize = Image.Image.resize
    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "resize", lambda image, *args, **kwargs: resampled.append(image.size)
                      or resize(image, *args, **kwargs))
        pixels = preprocessor.presets.range_for(ImageKind.PHOTO, None)
        ours = preprocessor.build([source], np.array([preprocessor.image_pad_id if family == "qwen2_5_vl"
                                                      else preprocessor.image_id]), [pixels])
    assert resampled == [] and ours.processed_sizes == [size]
    assert max_difference(family, preprocessor, [source], ImageKind.PHOTO) == 0.0


def test_the_image_pool_has_a_thread_per_core_the_process_may_use(checkpoints):
    """Its CPU affinity (taskset, a container's cpuset), not the machine's core count; at most one
    thread per image a request may carry."""
    cores = os.sched_getaffinity(0)
    path = checkpoints / "qwen2_5_vl"
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert load_preprocessor("qwen2_5_vl", path).pool._max_workers == 1
    finally:
        os.sched_setaffinity(0, cores)
    assert load_preprocessor("qwen2_5_vl", path).pool._max_workers == min(16, len(cores))  # 16: max_images
    assert load_preprocessor("qwen2_5_vl", path, max_images=1).pool._max_workers == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lone_image_is_packed_without_copying_its_patches(checkpoints, family):
    """A one-image request (and an image the encoder runs alone) hands its patches on as they are;
    several images are joined, and both unpack to what went in."""
    preprocessor = load_preprocessor(family, checkpoints / family)
    placeholder = preprocessor.image_pad_id if family == "qwen2_5_vl" else preprocessor.image_id
    pixels = preprocessor.checkpoint_range()
    images = preprocessor.build([picture(200, 120, seed=1), picture(64, 97, seed=2)], np.array([placeholder] * 2),
                                [pixels] * 2).images
    lone = pack(images[:1], SPECS[family])
    assert np.shares_memory(lone.tensors["pixel_values"], images[0]["pixel_values"])
    joined = pack(images, SPECS[family])
    assert not np.shares_memory(joined.tensors["pixel_values"], images[0]["pixel_values"])
    for packed, originals in ((lone, images[:1]), (joined, images)):
        for image, original in zip(unpack(packed, SPECS[family]), originals):
            assert image.keys() == original.keys()
            assert all(np.array_equal(image[name], original[name]) for name in image)
