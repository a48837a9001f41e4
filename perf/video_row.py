"""Rows 21 of `make bench` (also alone): video decode + preprocessing frames/s, and a 10-second clip's
request latency split by step (issue 27).

    .venv/bin/python -m perf.video_row [--requests 5] [--rounds 3]

Clips: 10 seconds of 640x360 at 30 fps, made here with PyAV (libx264 in MP4, libvpx-vp9 in WebM, a
keyframe every 2 seconds, about 1 Mbit/s): a smooth random texture panning under four moving squares,
so that every frame differs and the encoder cannot reduce the clip to a few frames. Each seed draws
another texture and other squares.

Rows 21a, 21b: frames/s through a family's whole preprocessing call on one clip, in this process (the
call Triton's `<family>_preprocess` step makes: the header probe, the sampling, the decode, then
Qwen2.5-VL's `QwenVideoProcessor` or Pixtral's frames as images), with the decode alone beside it, at
fps 2 (20 frames) and fps 8 with max_frames 64 (64 frames spread over the clip) on H.264, and fps 2 on
VP9. At the real checkpoints' limits: a copy of the tiny checkpoint with the real image limits
(`with_real_image_limits`) and Qwen2.5-VL's context of 128,000 tokens, so frames are resized as the
released models resize them (the tiny checkpoint's 224x224 cap and 4,096-token context would shrink them).
The median of `rounds` calls after a warm-up.

Rows 21c, 21d: one clip's request through the real Triton server (CPU profile, tiny checkpoints, both
ensembles and their encoders loaded), fps 2, 16 tokens, one request at a time, a clip never seen
before each time (the encoder runs, the prefix cache has nothing of it), the median of `requests`
after warm-up requests (two per preprocessing instance: each instance's first clip imports torch). The split comes from the server's own accounts, read before and after each request:
Triton's statistics give `compute_infer` of `<family>_preprocess` (decode + preprocessing) and of
`<family>_encoder` (the ONNX encoder); `<family>_generate` is decoupled (its execute hands the request
to the in-flight engine and returns), so generation is the engine's own seconds in steps while the
request ran (`vlm_engine_step_seconds_total` on Triton's metrics endpoint: prefill + 16 decode steps).
What the end-to-end time holds beyond the three is the rest: queues, the embed step (hashing, cache
lookup), the hand-offs between steps and gRPC.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
from PIL import Image

FAMILIES = ("qwen2_5_vl", "pixtral")
LABELS = {"qwen2_5_vl": "Qwen2.5-VL", "pixtral": "Pixtral"}
CLIP_SECONDS, CLIP_RATE, CLIP_SIZE = 10, 30, (640, 360)
# Container, encoder and options per codec: a keyframe every 2 s (the usual streaming setting); VP9 at
# libvpx's realtime speed (its default would take a minute to encode a clip on two cores).
ENCODERS = {
    "h264": ("mp4", "libx264", {"g": str(2 * CLIP_RATE)}),
    "vp9": ("webm", "libvpx-vp9", {"g": str(2 * CLIP_RATE), "deadline": "realtime", "cpu-used": "8"}),
}
# (label, codec, fps, max_frames) of the throughput rows' settings; the first is the row's headline.
SETTINGS = (("H.264, fps 2", "h264", 2.0, 32), ("H.264, fps 8, max_frames 64", "h264", 8.0, 64),
            ("VP9, fps 2", "vp9", 2.0, 32))
# The released models' context (config.json's max_position_embeddings): Qwen2.5-VL's 128,000.
REAL_CONTEXT = 128_000
MAX_TOKENS = 16


def moving_clip(codec: str = "h264", seed: int = 0) -> bytes:
    """A 10-second 640x360 clip at 30 fps: a smooth random texture panning under four moving squares."""
    container_format, encoder, options = ENCODERS[codec]
    width, height = CLIP_SIZE
    draw = np.random.default_rng(seed)
    # Noise at a quarter of the size, scaled up: blobs like a photo's, with room to pan 400x120 pixels.
    small = draw.integers(0, 256, (height // 4 + 30, width // 4 + 100, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(small).resize((small.shape[1] * 4, small.shape[0] * 4), Image.BILINEAR))
    squares = [(draw.integers(0, width - 60), draw.integers(0, height - 60), draw.integers(-6, 7),
                draw.integers(-4, 5), draw.integers(0, 256, 3).astype(np.uint8)) for _ in range(4)]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(encoder, rate=CLIP_RATE, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(CLIP_SECONDS * CLIP_RATE):
            left, top = (2 * index) % 400, index % 120
            pixels = texture[top:top + height, left:left + width].copy()
            for x, y, dx, dy, colour in squares:
                x, y = int((x + dx * index) % (width - 60)), int((y + dy * index) % (height - 60))
                pixels[y:y + 60, x:x + 60] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def video_messages(fps: float, max_frames: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "fps": fps, "max_frames": max_frames},
                                         {"type": "text", "text": "What happens in this clip?"}]}]


def real_model_checkpoint(family: str) -> Path:
    """A copy of the tiny checkpoint with the real model's image limits and a 128,000-token context."""
    from perf.bench import BENCH
    from vlm_serving.deploy.triton_server import BUILD
    from vlm_serving.tiny_checkpoints import with_real_image_limits

    target = with_real_image_limits(BUILD / "models" / family, BENCH / f"video_real_{family}", family)
    config = json.loads((target / "config.json").read_text())
    text = config.get("text_config", config)
    text["max_position_embeddings"] = REAL_CONTEXT
    (target / "config.json").write_text(json.dumps(config))
    return target


def frame_size(preprocessor, frames: int) -> tuple[int, int]:
    """(width, height) each of a clip's `frames` 640x360 frames is processed at."""
    width, height = CLIP_SIZE
    if preprocessor.family == "qwen2_5_vl":
        rows, cols = preprocessor.video.frame_size(frames, width, height)
    else:
        rows, cols = preprocessor.checked_target_size(width, height, 0, preprocessor.frame_range(frames, None))
    return cols, rows


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def throughput_row(key: str, family: str, clips: dict[str, bytes], rounds: int) -> tuple:
    """frames/s of the family's preprocessing call (and of the decode alone) at each of SETTINGS."""
    from perf.bench import progress
    from vlm_serving.preprocessing.preprocess import load_preprocessor
    from vlm_serving.preprocessing.video import decode_video

    progress(f"row {key}: {LABELS[family]} video decode + preprocessing")
    preprocessor = load_preprocessor(family, real_model_checkpoint(family))
    parts, headline = [], None
    for label, codec, fps, max_frames in SETTINGS:
        clip, messages = clips[codec], json.dumps(video_messages(fps, max_frames))
        call = lambda: preprocessor([], messages, MAX_TOKENS, encoded_videos=[clip])  # noqa: E731
        frames = call().video_frames[0]  # warm-up (Qwen's first clip imports torch for its resize)
        # The whole call and the decode alone in alternation: both under the same load from other processes.
        pairs = [(seconds(call), seconds(lambda: decode_video(clip, fps, max_frames))) for _ in range(rounds)]
        whole, decode = (statistics.median(side) for side in zip(*pairs))
        width, height = frame_size(preprocessor, frames)
        parts.append(f"{label}: {frames} frames at {width}x{height}, {frames / whole:.1f} frames/s "
                     f"({1000 * whole:.0f} ms a clip; decode alone {frames / decode:.1f} frames/s)")
        headline = headline or frames / whole
    return (key, f"video decode + preprocessing frames/s, {LABELS[family]}, one 10 s 640x360 30 fps clip a call, "
            f"real checkpoints' limits (median of {rounds})", "; ".join(parts), headline, "report", "frames/s", "")


def step_totals(server, family: str) -> dict[str, float]:
    """Running totals of the server's accounts: requests and compute seconds of the preprocessing and
    encoder steps (Triton's statistics), the engine's seconds in steps and prompt tokens prefilled (metrics)."""
    import tritonclient.grpc as grpcclient

    totals = {}
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for step in ("preprocess", "encoder"):
            stats = client.get_inference_statistics(f"{family}_{step}", as_json=True)["model_stats"]
            totals[f"{step} requests"] = sum(int(s.get("inference_count", 0)) for s in stats)
            totals[step] = sum(int(s["inference_stats"]["compute_infer"].get("ns", 0)) for s in stats) / 1e9
    finally:
        client.close()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    for name, metric in (("generate", "vlm_engine_step_seconds_total"), ("prefill tokens", "vlm_engine_prefill_tokens_total")):
        match = re.search(rf'^{metric}{{model="{family}_generate"[^}}]*}} (\S+)$', metrics, re.MULTILINE)
        totals[name] = float(match.group(1)) if match else 0.0
    return totals


def request_split(server, family: str, clip: bytes) -> tuple[dict[str, float], object]:
    """One request's seconds by step and end to end, and its result. Triton's accounts lag the last
    response a little: they are read again until the request shows in them and then hold still."""
    from vlm_serving.ensemble_client import generate

    before = step_totals(server, family)
    started = time.perf_counter()
    result = generate(server.grpc_url, family, video_messages(2.0, 32), [], videos=[clip], max_tokens=MAX_TOKENS)
    end_to_end = time.perf_counter() - started
    deadline, after = time.monotonic() + 10, step_totals(server, family)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = step_totals(server, family)
        counted = again["preprocess requests"] > before["preprocess requests"] and again["generate"] > before["generate"]
        if counted and again == after:
            break
        after = again
    split = {name: after[name] - before[name] for name in after}
    split["end to end"] = end_to_end
    return split, result


def latency_row(key: str, family: str, server, clips: list[bytes]) -> tuple:
    """The median split of one clip's request (fps 2: 20 frames, 16 tokens) over clips[1:]; clips[0] warms up."""
    from perf.bench import progress
    from tritonclient.utils import InferenceServerException
    from vlm_serving.deploy.render import PROFILES, preprocess_instances
    from vlm_serving.preprocessing.video import sample_times

    progress(f"row {key}: {LABELS[family]}, one 10 s clip's request latency by step")
    try:
        # Each preprocessing instance's first clip imports torch (about 1 s) and the engine's first prefills
        # are slow: warm-up requests until, in turn, every instance has likely had one.
        for _ in range(2 * preprocess_instances(PROFILES["cpu"])):
            request_split(server, family, clips[0])
        measured = [request_split(server, family, clip) for clip in clips[1:]]
    except InferenceServerException as exc:
        return (key, f"{LABELS[family]}: a 10 s clip's request latency", "", None, "report", "ms", f"failed: {exc}")
    splits = [split for split, _ in measured]
    median = {name: statistics.median(split[name] for split in splits) for name in splits[0]}
    rest = statistics.median(s["end to end"] - s["preprocess"] - s["encoder"] - s["generate"] for s in splits)
    failed = ", ".join(problem for problem, found in (
        ("the encoder did not run for every clip", any(s["encoder requests"] < 1 for s in splits)),
        (f"answers ended before {MAX_TOKENS} tokens", any(r.completion_tokens != MAX_TOKENS for _, r in measured)),
    ) if found)
    each = " ; ".join(f"{1000 * split['end to end']:.0f}" for split in splits)
    frames, tokens = len(sample_times(CLIP_SECONDS, 2.0, 32, CLIP_RATE)), measured[0][1].image_tokens
    return (key, f"{LABELS[family]}: one 10 s 640x360 clip's request latency, fps 2 ({frames} frames, {tokens} "
            f"{'video' if family == 'qwen2_5_vl' else 'image'} tokens), {MAX_TOKENS} tokens, a new clip each time, "
            f"c=1, tiny checkpoints (median of {len(splits)})",
            f"decode + preprocess {1000 * median['preprocess']:.0f} ms, encode {1000 * median['encoder']:.0f} ms, "
            f"generate {1000 * median['generate']:.0f} ms (prefill {median['prefill tokens']:.0f} tokens + "
            f"{MAX_TOKENS - 1} decode steps), rest {1000 * rest:.0f} ms; end to end {each} ms",
            1000 * median["end to end"], "report", "ms", failed)


def served_models(servers: list):
    """A started Triton (CPU profile, tiny checkpoints) with both families' ensembles and encoders."""
    from perf.bench import BENCH, free_port, launch, progress, repository
    from vlm_serving.deploy.triton_server import TritonServer

    progress("starting Triton 'video_row'")
    models = tuple(name for family in FAMILIES for name in (family, f"{family}_encoder"))
    server = TritonServer(repository=repository("video_row"), http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), log_path=BENCH / "video_row.log", load_models=models)
    launch(server, servers)
    server.wait_ready(300)
    return server


def rows(servers: list, requests: int = 5, rounds: int = 3):
    """Rows 21a-d, each yielded as it is measured: the throughput rows in this process first (no server
    of this row running yet), then the latency rows on a server started for them (stopped after;
    `servers`: the bench's, so that a stopped bench stops it too)."""
    from perf.bench import progress
    from vlm_serving.deploy.triton_server import stop_all

    progress("row 21: encoding the clips")
    clips = {codec: moving_clip(codec, seed=0) for codec in ENCODERS}
    for key, family in zip("ab", FAMILIES):
        yield throughput_row(f"21{key}", family, clips, rounds)
    fresh = [moving_clip("h264", seed=100 + i) for i in range(requests + 1)]  # each family's encoder sees each once
    server = served_models(servers)
    try:
        for key, family in zip("cd", FAMILIES):
            yield latency_row(f"21{key}", family, server, fresh)
    finally:
        stop_all([server])
        servers.remove(server)


def main(argv: list[str] | None = None) -> int:
    from perf.bench import BENCH, Table, print_table
    from vlm_serving.deploy.stack import stop_on_signals
    from vlm_serving.deploy.triton_server import stop_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5, help="measured requests per family (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="preprocessing calls per setting (after a warm-up)")
    args = parser.parse_args(argv)
    stop_on_signals()
    BENCH.mkdir(parents=True, exist_ok=True)
    servers: list = []
    table = Table()
    try:
        for row in rows(servers, args.requests, args.rounds):
            table.add(row)
    finally:
        stop_all(reversed(servers))
    print_table(table.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
