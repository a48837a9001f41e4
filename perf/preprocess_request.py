"""Whole-request preprocessing time (header checks, token budget, chat template, decode, resize).

    .venv/bin/python -m perf.preprocess_request [--rounds 30]

One request per family: a 400-word prompt and four 640x480 JPEGs, median of `rounds` calls of the
preprocessor as the Triton model calls it. `make bench` row 3 measures the image tensors alone.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
from PIL import Image

from vlm_serving.pipelines import FAMILIES
from vlm_serving.deploy.triton_server import BUILD
from vlm_serving.preprocessing.preprocess import load_preprocessor


def request() -> tuple[list[bytes], str]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    text = "Compare these pictures in detail. " * 20
    return images, json.dumps([{"role": "user", "content": [{"type": "image"}] * 4 + [{"type": "text", "text": text}]}])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    images, messages = request()
    print("| family | ms per request (median) |\n| --- | --- |")
    for family in FAMILIES:
        preprocessor = load_preprocessor(family, BUILD / "models" / family)
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            preprocessor(images, messages, max_tokens=64)
            times.append(time.perf_counter() - started)
        print(f"| {family} | {statistics.median(times) * 1000:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
