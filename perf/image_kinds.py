"""The image-kind classifier on a corpus of real images: confusion matrix, accuracy, time.

    .venv/bin/python -m perf.image_kinds [--rounds 20]

Builds the corpora first (perf/image_corpus.py, under build/image_corpus/): the one the
thresholds were set on, and a held-out one. Time: `classify` on
each corpus image resized to about one megapixel (aspect kept), decoded beforehand as the
preprocessing step has it; the median of `--rounds` calls per image, then the median and the
worst image. Goal: at most 2 ms per megapixel, and >= 90% accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from PIL import Image

from perf.image_corpus import build
from vlm_serving.preprocessing.image_kind import ImageKind, classify


def one_megapixel(image: Image.Image) -> Image.Image:
    scale = (1_000_000 / (image.width * image.height)) ** 0.5
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)


def ms_per_call(image: Image.Image, rounds: int) -> float:
    classify(image)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        classify(image)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def accuracy_and_time(rounds: int = 5) -> tuple[int, int, float, float]:
    """(held-out images right, held-out images, median and worst ms per 1-megapixel image over the
    tuning corpus), for the bench's row."""
    right = 0
    held_out = build(held_out=True)
    for path, kind in held_out:
        with Image.open(path) as opened:
            right += classify(opened.convert("RGB")) == kind
    timings = []
    for path, _ in build():
        with Image.open(path) as opened:
            timings.append(ms_per_call(one_megapixel(opened.convert("RGB")), rounds))
    return right, len(held_out), statistics.median(timings), max(timings)


def confusion_table(corpus, title: str, timings: list[float] | None = None, rounds: int = 0) -> None:
    kinds = list(ImageKind)
    confusion = {(truth, guess): 0 for truth in kinds for guess in kinds}
    wrong = []
    for index, (path, truth) in enumerate(corpus, 1):
        print(f"\r{title}: image {index} of {len(corpus)}", end="", file=sys.stderr, flush=True)
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        guess = classify(image)
        confusion[truth, guess] += 1
        if guess != truth:
            wrong.append(f"{path.name} ({truth.value}) as {guess.value}")
        if timings is not None:
            timings.append(ms_per_call(one_megapixel(image), rounds))
    print(file=sys.stderr)
    print(f"\n{title}\n")
    print("| true kind \\ classified as | " + " | ".join(kind.value for kind in kinds) + " |")
    print("| --- |" + " --- |" * len(kinds))
    for truth in kinds:
        print(f"| {truth.value} ({sum(confusion[truth, guess] for guess in kinds)} images) | "
              + " | ".join(str(confusion[truth, guess]) for guess in kinds) + " |")
    right = sum(confusion[kind, kind] for kind in kinds)
    print(f"\naccuracy: {right} of {len(corpus)} = {right / len(corpus):.1%} (goal >= 90%)")
    for line in wrong:
        print(f"- misclassified: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    timings: list[float] = []
    confusion_table(build(), "tuning corpus (the thresholds were set on it)", timings, args.rounds)
    confusion_table(build(held_out=True), "held-out corpus (never looked at while tuning)")
    print(f"\ntime per 1-megapixel image (tuning corpus): median {statistics.median(timings):.2f} ms, "
          f"worst {max(timings):.2f} ms over {len(timings)} images (goal <= 2 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
