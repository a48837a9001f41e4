"""Where preprocessing's time goes, step by step, on the images of `make bench` rows 3a/3b.

    .venv/bin/python -m perf.preprocessing_profile [--rounds 7]

perf.workload's 16 images (four each of a 640x480 JPEG, an 800x600 PNG, a 300x450 WebP and a
160x120 GIF), best of `--rounds` runs (the machine is shared: the best run is the least disturbed).
Per image: decoding (every check, upright RGB) and the kind classifier. Per family, at the tiny
checkpoints' limits and at the real ones (what rows 3a/3b compare), in ms for the 16 images on one
thread: Pillow's bicubic resize to the target sizes; `patchify` of the pictures already at their
target sizes (to an array, normalize, patchify, the encoder's index tensors: all but the resize);
`build` (resize + patchify + placeholders); transformers' image processor on the same pictures.
Then `build` on the instance's thread pool, which rows 3a/3b time against transformers.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image
from transformers import AutoImageProcessor

from perf.bench import BUILD, checkpoint_with_real_limits
from perf.workload import workload
from vlm_serving.pipelines import FAMILIES
from vlm_serving.preprocessing.image_kind import classify
from vlm_serving.preprocessing.images import decode_image
from vlm_serving.preprocessing.preprocess import load_preprocessor


def best_ms(function, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def target_sizes(preprocessor, pictures: list[Image.Image]) -> list[tuple[int, int]]:
    """(width, height) each picture is processed at, at the checkpoint's own limits."""
    pixels = preprocessor.checkpoint_range()
    if preprocessor.family == "qwen2_5_vl":
        return [preprocessor.processing_size(p.width, p.height, pixels)[::-1] for p in pictures]
    return [preprocessor.checked_target_size(p.width, p.height, i, pixels)[::-1] for i, p in enumerate(pictures)]


def family_row(family: str, real_limits: bool, pictures: list[Image.Image], rounds: int) -> str:
    checkpoint = checkpoint_with_real_limits(family) if real_limits else BUILD / "models" / family
    alone, pooled = load_preprocessor(family, checkpoint, threads=1), load_preprocessor(family, checkpoint)
    theirs = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=True)
    sizes = target_sizes(alone, pictures)
    at_target = [p.resize(size, Image.Resampling.BICUBIC) for p, size in zip(pictures, sizes)]
    pixels = alone.checkpoint_range()
    if family == "qwen2_5_vl":
        patchify = lambda: [alone.patchify(p, pixels) for p in at_target]  # noqa: E731
    else:
        patchify = lambda: [alone.patchify(p, (p.height, p.width)) for p in at_target]  # noqa: E731
    placeholders = np.array([alone.image_pad_id if family == "qwen2_5_vl" else alone.image_id] * len(pictures))
    ranges = [pixels] * len(pictures)
    steps = [
        lambda: [p.resize(size, Image.Resampling.BICUBIC) for p, size in zip(pictures, sizes) if p.size != size],
        patchify,
        lambda: alone.build(pictures, placeholders, ranges),
        lambda: theirs(pictures, return_tensors="np"),
        lambda: pooled.build(pictures, placeholders, ranges),
    ]
    megapixels = sum(width * height for width, height in sizes) / 1e6
    times = " | ".join(f"{best_ms(step, rounds):.1f}" for step in steps)
    return f"| {family}, {'real' if real_limits else 'tiny'} limits | {megapixels:.2f} | {times} | {pooled.pool._max_workers} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    encoded = [item.image for item in workload(16)]
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in encoded]
    print("| step, per image | ms |\n| --- | --- |")
    for fmt in ("JPEG", "PNG", "WEBP", "GIF"):
        files = [data for data in encoded if Image.open(io.BytesIO(data)).format == fmt]
        width, height = Image.open(io.BytesIO(files[0])).size
        ms = best_ms(lambda: [decode_image(data) for data in files], args.rounds) / len(files)
        print(f"| decode {fmt} {width}x{height} | {ms:.2f} |")
    print(f"| classify the kind | {best_ms(lambda: [classify(p) for p in pictures], args.rounds) / len(pictures):.2f} |")
    print("\n| family, limits | output Mpx | resize | patchify at target size | build, 1 thread | transformers, 1 thread "
          "| build, pool | pool threads |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for real_limits in (False, True):
        for family in FAMILIES:
            print(family_row(family, real_limits, pictures, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
