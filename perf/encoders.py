"""Vision encoder benchmarks, in this process (part of `make bench`; also runnable alone):

    .venv/bin/python -m perf.encoders [--rounds 3]

- images/s of the exported ONNX encoder (ONNX Runtime, CPU) / the transformers tower on the same
  images, fp32 outputs required equal to 1e-4 (a row past it is marked, not a result); the int8
  row is speed over unequal outputs and says so: for the served tiny checkpoints and for a mid-size
  Qwen2.5-VL-style tower (4 blocks, 1280 wide as the real one; random weights) on 448x448 images;
- token agreement of greedy answers with the int8 encoder against fp32 (16 tokens, the bench
  workload's images), reported, not asserted.

`--profile` prints instead where the mid-size tower's time goes, per ONNX Runtime operator and
per torch operator, for one 448x448 image (the numbers behind perf/RESULTS.md's encoder notes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from perf.workload import workload
from vlm_serving.deploy.triton_server import BUILD
from vlm_serving.encoding.encoder import OnnxEncoder
from vlm_serving.preprocessing.preprocess import load_preprocessor

BENCH = BUILD / "bench"
THREADS = min(2, os.cpu_count() or 1)  # the serving instance's share of this 2-core machine
# The real Qwen2.5-VL-7B tower is 32 blocks of this width; 4 keep the run short.
MID_QWEN_VISION = dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=64,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[1, 3])


def mid_size_qwen_checkpoint() -> Path:
    """The tiny Qwen2.5-VL checkpoint with a mid-size vision tower (random weights), exported."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from vlm_serving.encoding.encoder_export import export

    target = BENCH / "mid_qwen2_5_vl"
    if not (target / "onnx" / "encoder.fp32.onnx").is_file():
        config = AutoConfig.from_pretrained(BUILD / "models" / "qwen2_5_vl", local_files_only=True)
        for key, value in MID_QWEN_VISION.items():
            setattr(config.vision_config, key, value)
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(target)
        for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (target / name).write_bytes((BUILD / "models" / "qwen2_5_vl" / name).read_bytes())
        config_path = target / "preprocessor_config.json"
        processor = json.loads(config_path.read_text())
        processor.update(max_pixels=448 * 448, size={"shortest_edge": 3136, "longest_edge": 448 * 448})
        config_path.write_text(json.dumps(processor))
        export(target, ("fp32", "int8"))
    return target


def tower_call(family: str, model, images: list[dict]):
    """transformers' own encoder call on the same images (Qwen: visual; Pixtral: features + projector)."""
    if family == "qwen2_5_vl":
        patches = torch.from_numpy(np.concatenate([i["pixel_values"] for i in images]))
        grid = torch.tensor([[1, *(i["position_ids"].max(0) + 1)] for i in images])
        return lambda: model.model.visual(patches, grid_thw=grid).pooler_output
    sizes = [tuple((i["position_ids"].max(0) + 1) * 16) for i in images]
    pixels = torch.zeros(len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for n, (image, (h, w)) in enumerate(zip(images, sizes)):
        pixels[n, :, :h, :w] = torch.from_numpy(image["pixel_values"]).reshape(h // 16, w // 16, 3, 16, 16).permute(2, 0, 3, 1, 4).reshape(3, h, w)
    return lambda: torch.cat(list(model.model.get_image_features(
        pixels, vision_feature_layer=-1, vision_feature_select_strategy="full", image_sizes=torch.tensor(sizes)
    ).pooler_output))


def encoder_speed(family: str, checkpoint: Path, pictures: list[Image.Image], rounds: int,
                  variant: str = "fp32") -> tuple[float, float, float]:
    """(ONNX Runtime images/s, transformers images/s, max abs difference), alternating the two."""
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(THREADS)
    preprocessor = load_preprocessor(family, checkpoint)
    placeholder = preprocessor.image_pad_id if family == "qwen2_5_vl" else preprocessor.image_id
    ranges = [preprocessor.checkpoint_range()] * len(pictures)
    images = preprocessor.build(pictures, np.array([placeholder] * len(pictures)), ranges).images
    encoder = OnnxEncoder(family, checkpoint / "onnx", variant, threads=THREADS)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
    theirs_call = tower_call(family, model, images)
    with torch.inference_mode():
        difference = float(np.abs(np.concatenate(encoder.encode(images)) - theirs_call().numpy()).max())
        ours, theirs = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            encoder.encode(images)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            theirs_call()
            theirs.append(time.perf_counter() - started)
    return len(images) / statistics.median(ours), len(images) / statistics.median(theirs), difference


def int8_token_agreement(family: str, items, max_tokens: int = 16) -> tuple[float, int]:
    """Share of greedy tokens (position by position) the int8 encoder's answers share with fp32's."""
    from vlm_serving.generation.batch import BatchGenerator, GenerationRequest
    from vlm_serving.generation.loading import load_model, load_tokenizer
    from vlm_serving.generation.sampling import SamplingParams

    checkpoint = BUILD / "models" / family
    preprocessor = load_preprocessor(family, checkpoint)
    generator = BatchGenerator(family, load_model(checkpoint), load_tokenizer(checkpoint))
    answers = {}
    for variant in ("fp32", "int8"):
        encoder = OnnxEncoder(family, checkpoint / "onnx", variant, threads=THREADS)
        requests = []
        for item in items:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.prompt}]}]
            pre = preprocessor([item.image], json.dumps(messages))
            requests.append(GenerationRequest(pre.input_ids, SamplingParams(max_tokens=max_tokens),
                                              image_embeds=np.concatenate(encoder.encode(pre.images)),
                                              language_tensors=pre.language_tensors, image_tokens=pre.image_tokens))
        outputs = {}
        generator.generate(requests, lambda i, update: outputs.__setitem__(i, update.token_ids))
        answers[variant] = [outputs[i] for i in range(len(items))]
    same = total = 0
    for fp32, int8 in zip(answers["fp32"], answers["int8"]):
        total += max(len(fp32), len(int8))
        same += sum(a == b for a, b in zip(fp32, int8))
    return same / total, total


# fp32 encoder outputs against the transformers tower (the export check's bound; docs/configuration.md: Vision encoders).
FP32_TOLERANCE = 1e-4


def rows(rounds: int = 3) -> list[tuple]:
    """(key, measure, measured, ratio, goal, unit, why it is not a result or "") rows for perf.bench's table."""
    items = workload(16)
    pictures = [Image.open(io.BytesIO(item.image)).convert("RGB") for item in items]
    result = []
    mid = [p.resize((448, 448)) for p in pictures[:2]]
    cases = [("5a", "qwen2_5_vl", BUILD / "models" / "qwen2_5_vl", pictures, "fp32", "tiny Qwen2.5-VL tower, 16 images"),
             ("5b", "pixtral", BUILD / "models" / "pixtral", pictures, "fp32", "tiny Pixtral tower + projector, 16 images"),
             ("5c", "qwen2_5_vl", mid_size_qwen_checkpoint(), mid, "fp32",
              "Qwen2.5-VL-style tower 4x1280, 2 images 448x448 (1024 patches each)"),
             ("5d", "qwen2_5_vl", mid_size_qwen_checkpoint(), mid, "int8", "the same tower and images")]
    for key, family, checkpoint, images, variant, label in cases:
        ours, theirs, difference = encoder_speed(family, checkpoint, images, rounds, variant)
        if variant == "fp32":
            unequal = f"outputs differ by {difference:.1e} (> {FP32_TOLERANCE:g})" if difference > FP32_TOLERANCE else ""
            goal = ">= 1.3"
        else:  # quantized on purpose: a speed, not an equal-output ratio
            unequal, goal = "", "reported: speed over unequal outputs"
        result.append((key, f"encoder images/s, ONNX Runtime {variant} / transformers, {label} (max |diff| {difference:.1e})",
                       f"{ours:.2f} / {theirs:.2f} images/s", ours / theirs, goal, "x", unequal))
    for family in ("qwen2_5_vl", "pixtral"):
        agreement, tokens = int8_token_agreement(family, items)
        result.append(("7", f"int8 encoder: greedy tokens equal to fp32's, {family}, 16 requests x 16 tokens",
                       f"{agreement * tokens:.0f} of {tokens} tokens", agreement, "reported", "x", ""))
    return result


def profile() -> None:
    """Share of time per operator: ONNX Runtime's profiler and torch's, one 448x448 image, 2 threads."""
    from collections import Counter

    import onnxruntime as ort
    from transformers import AutoModelForImageTextToText

    from vlm_serving.encoding.encoder_inputs import QWEN_SPEC, graph_inputs, pack

    checkpoint = mid_size_qwen_checkpoint()
    preprocessor = load_preprocessor("qwen2_5_vl", checkpoint)
    picture = Image.open(io.BytesIO(workload(1)[0].image)).convert("RGB").resize((448, 448))
    images = preprocessor.build([picture], np.array([preprocessor.image_pad_id]), [preprocessor.checkpoint_range()]).images
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    options.profile_file_prefix = str(BENCH / "encoder_profile")
    session = ort.InferenceSession(str(checkpoint / "onnx" / "encoder.fp32.onnx"), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, graph_inputs(pack(images, QWEN_SPEC).tensors))
    per_op: Counter = Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 3 / 1000
    total = sum(per_op.values())
    print(f"ONNX Runtime: {total:.0f} ms per image")
    for op, ms in per_op.most_common(8):
        print(f"  {op:24s} {ms:8.1f} ms {100 * ms / total:5.1f}%")
    torch.set_num_threads(THREADS)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
    call = tower_call("qwen2_5_vl", model, images)
    with torch.inference_mode():
        call()
        with torch.profiler.profile() as profiler:
            call()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="where the mid-size tower's time goes, per operator")
    args = parser.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile()
        return 0
    print("| # | measure | measured | ratio | goal |\n| --- | --- | --- | --- | --- |")
    for key, name, measured, ratio, goal, _, unequal in rows(args.rounds):
        print(f"| {key} | {name} | {measured} | {f'not a result: {unequal}' if unequal else f'{ratio:.2f}x'} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
