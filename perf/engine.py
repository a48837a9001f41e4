"""Generation scheduling on the engine alone (no Triton): static batches against in-flight batching.

    .venv/bin/python -m perf.engine                       # the tiny checkpoints, CPU
    python -m perf.engine --config real --device cuda     # `make bench-gpu`: Qwen2.5-VL-7B and
                                                          # Pixtral-12B configurations, bf16, random weights

Needs only torch, transformers and this repository (no Triton, no network): it runs as it is on
the GPU machine. The workload is mixed: most answers short, some long, half the requests with an
image (its embedding rows drawn at random: the engine receives embeddings, never pixels). Per family:
1. throughput at saturation (every request waiting at the start), in flight / static;
2. open loop, Poisson arrivals at 70% of static's saturation rate: p99 latency of the short
   requests and p99 time to first token, in flight / static;
3. the scheduler's cost per step at batch 1: one request through the engine / plain `generate`.
Static runs what a static generation instance runs: whenever it is free, one `generate` over
everything that has arrived (up to its max batch), as Triton's dynamic batcher hands it over.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from perf.stats import percentile
from vlm_serving.generation.batch import BatchGenerator, GenerationRequest, run_batch
from vlm_serving.generation.engine import EngineLoop, InflightEngine, RequestSink
from vlm_serving.generation.loading import load_model, load_tokenizer
from vlm_serving.generation.sampling import SamplingParams
from vlm_serving.generation.scheduling import EngineLimits

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_5_vl", "pixtral")


def progress(message: str) -> None:
    print(f"perf.engine: {message}", file=sys.stderr, flush=True)


class IdTokenizer:
    """Decodes any id to one character: random-weight models at real sizes emit ids that no small
    tokenizer knows, and the text of random weights means nothing anyway. Ids 0-127 stand for
    ASCII (so grammars find their punctuation and digits)."""

    @staticmethod
    def piece(token: int) -> str:
        return chr(token) if token < 128 else chr(0x4E00 + token % 20000)

    def decode(self, ids, **kwargs) -> str:
        return "".join(map(self.piece, ids))


def format_compiler(generator: BatchGenerator):
    """The engine's grammar compiler for `generator`'s tokenizer (the id tokenizer's own vocabulary)."""
    from vlm_serving.generation.grammar import FormatCompiler

    vocab_size = int(generator.model.config.get_text_config().vocab_size)
    if not isinstance(generator.tokenizer, IdTokenizer):
        return FormatCompiler.for_tokenizer(generator.tokenizer, vocab_size, generator.eos_ids)
    import xgrammar as xgr

    vocabulary = [IdTokenizer.piece(token) for token in range(vocab_size)]
    return FormatCompiler(xgr.TokenizerInfo(vocabulary, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size,
                                            stop_token_ids=sorted(generator.eos_ids)))


def real_config(family: str):
    """The published Qwen2.5-VL-7B-Instruct / Pixtral-12B configurations (their config.json values)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig, Qwen2_5_VLConfig

    if family == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                             rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1000000.0),
            vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420,
                               num_heads=16, fullatt_block_indexes=[7, 15, 23, 31]),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        )
        config.text_config.eos_token_id = config.text_config.pad_token_id = 151645
    else:
        config = LlavaConfig(
            vision_config=PixtralVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=1024, patch_size=16),
            text_config=MistralConfig(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                                      max_position_embeddings=1024000, rope_theta=1000000000.0, sliding_window=None),
            image_token_index=10, vision_feature_layer=-1, vision_feature_select_strategy="full",
            multimodal_projector_bias=True, projector_hidden_act="gelu",
        )
        config.text_config.eos_token_id, config.text_config.pad_token_id = 2, 11
    return config


def real_model(family: str, device: str):
    """Random bf16 weights at the real configuration (built on the device: no checkpoint to read)."""
    from transformers import AutoModelForImageTextToText

    config = real_config(family)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    return model.eval(), IdTokenizer()


@dataclass(frozen=True)
class Shape:
    """One configuration's workload sizes."""

    prompt_tokens: int
    image_tokens: int  # per image (a square grid of merged patches)
    short_tokens: int
    long_tokens: int
    max_batch: int  # static's max batch = in flight's max running rows


SHAPES = {
    "tiny": Shape(prompt_tokens=40, image_tokens=64, short_tokens=16, long_tokens=160, max_batch=16),
    "real": Shape(prompt_tokens=60, image_tokens=256, short_tokens=32, long_tokens=384, max_batch=32),
}


@dataclass
class Timing:
    arrival: float = 0.0
    first: float | None = None
    end: float | None = None
    short: bool = True
    tokens: int = 0


def make_requests(generator: BatchGenerator, shape: Shape, count: int, seed: int = 0) -> list[tuple[GenerationRequest, bool]]:
    """(request, is short): 1 in 5 long, every other one with an image."""
    rng = np.random.default_rng(seed)
    config = generator.model.config
    hidden = config.get_text_config().hidden_size
    vocab = config.get_text_config().vocab_size
    special = {generator.image_token_id, *generator.eos_ids, generator.pad_id}
    requests = []
    for i in range(count):
        short = i % 5 != 4
        text = rng.integers(100, min(vocab, 30000), shape.prompt_tokens + int(rng.integers(0, 20)))
        text = np.array([t if t not in special else 100 for t in text], dtype=np.int64)
        embeds, tensors, image_tokens = None, {}, 0
        if i % 2 == 0:
            image_tokens = shape.image_tokens
            side = int(np.sqrt(image_tokens))
            text = np.concatenate([text[:5], np.full(image_tokens, generator.image_token_id), text[5:]])
            embeds = (rng.standard_normal((image_tokens, hidden)) * 0.02).astype(np.float32)
            if generator.marks_modalities:
                tensors = {"image_grid_thw": np.array([[1, 2 * side, 2 * side]], dtype=np.int64)}
        params = SamplingParams(max_tokens=shape.short_tokens if short else shape.long_tokens, stream=True)
        requests.append((GenerationRequest(text, params, embeds, tensors, image_tokens), short))
    return requests


def timed_sink(timing: Timing, done: queue.Queue) -> RequestSink:
    def send(update):
        now = time.perf_counter()
        if timing.first is None:
            timing.first = now
        if update.finished:
            timing.end, timing.tokens = now, update.completion_tokens
            done.put(timing)

    def fail(exc):
        timing.end = time.perf_counter()
        done.put(timing)
        progress(f"a request failed: {exc!r}")

    return RequestSink(send, fail)


_FORMATS: dict = {}  # per generator: one compiler, so its cache serves every run


@dataclass
class CacheUse:
    """Over a run's steps: token slots of the blocks the rows hold, those holding a token, step seconds."""

    slots: int = 0
    real: int = 0
    cache_seconds: float = 0.0
    step_seconds: float = 0.0

    def record(self, stats) -> None:
        self.slots += stats.cache_tokens_used
        self.real += stats.cache_tokens_real
        self.cache_seconds, self.step_seconds = stats.cache_seconds, stats.step_seconds


def arrive(requests, arrivals: list[float], submit) -> list[Timing]:
    """Hand each (request, is short) to `submit(request, timing)` at its arrival offset (seconds)."""
    timings = []
    start = time.perf_counter()
    for (request, short), offset in zip(requests, arrivals):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        timing = Timing(arrival=time.perf_counter(), short=short)
        timings.append(timing)
        submit(request, timing)
    return timings


def run_inflight(generator: BatchGenerator, limits: EngineLimits, requests, arrivals: list[float],
                 cache_use: CacheUse | None = None) -> list[Timing]:
    engine = InflightEngine(generator, limits)
    if any(request.params.response_format.constrained for request, _ in requests):
        engine.formats = _FORMATS.setdefault(id(generator), format_compiler(generator))
    if cache_use is not None:
        engine.on_step = cache_use.record
    loop = EngineLoop(engine, log_error=progress).start()
    done: queue.Queue = queue.Queue()
    timings = arrive(requests, arrivals, lambda request, timing: engine.submit(request, timed_sink(timing, done)))
    for _ in requests:
        done.get()
    loop.stop(grace_s=0, reason=RuntimeError("benchmark over"))
    return timings


def run_static(generator: BatchGenerator, max_batch: int, requests, arrivals: list[float]) -> list[Timing]:
    """One thread generating whatever has arrived, `max_batch` at a time (a static instance)."""
    waiting: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def serve():
        served = 0
        while served < len(requests):
            batch = [waiting.get()]
            while len(batch) < max_batch:
                try:
                    batch.append(waiting.get_nowait())
                except queue.Empty:
                    break
            sinks = [timed_sink(timing, done) for _, timing in batch]
            run_batch(generator, [request for request, _ in batch],
                      send_update=lambda index, update: sinks[index].send_update(update),
                      send_error=lambda index, exc: sinks[index].send_error(exc))
            served += len(batch)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    timings = arrive(requests, arrivals, lambda request, timing: waiting.put((request, timing)))
    for _ in requests:
        done.get()
    server.join()
    return timings


@dataclass
class Run:
    timings: list[Timing] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return max(t.end for t in self.timings) - min(t.arrival for t in self.timings)

    @property
    def requests_per_s(self) -> float:
        return len(self.timings) / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.timings) / self.seconds

    def short_p99(self) -> float:
        return percentile([t.end - t.arrival for t in self.timings if t.short], 99)

    def first_token_p99(self) -> float:
        return percentile([t.first - t.arrival for t in self.timings], 99)


def step_overhead(generator: BatchGenerator, shape: Shape, device: str) -> tuple[float, float]:
    """Seconds per token for one request alone: (engine, plain `generate`); median of 7 alternating rounds."""
    request, _ = make_requests(generator, shape, 2)[1]  # text only
    request = GenerationRequest(request.input_ids, SamplingParams(max_tokens=shape.long_tokens))
    ids = torch.from_numpy(request.input_ids)[None].to(device)

    def plain() -> int:
        with torch.inference_mode():
            out = generator.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=shape.long_tokens)
        return out.shape[1] - ids.shape[1]

    def engine() -> int:
        [timing] = run_inflight(generator, EngineLimits(), [(request, True)], [0.0])
        return timing.tokens

    per_token = {"engine": [], "plain": []}
    for _ in range(7):
        for name, call in (("engine", engine), ("plain", plain)):
            started = time.perf_counter()
            tokens = call()
            sync(device)
            per_token[name].append((time.perf_counter() - started) / tokens)
    return statistics.median(per_token["engine"]), statistics.median(per_token["plain"])


TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {
        "objects": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "label": {"type": "string", "maxLength": 16},
            "bbox_2d": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 4096},
                        "minItems": 4, "maxItems": 4}},
            "required": ["label", "bbox_2d"], "additionalProperties": False}},
        "caption": {"type": "string", "maxLength": 48},
    },
    "required": ["objects", "caption"], "additionalProperties": False,
}


def constrained_rows(family: str, generator: BatchGenerator, shape: Shape) -> list[tuple]:
    """Tokens/s with a JSON Schema against free text (both sampled, temperature 1) at batch 1 and
    16, and the schema's compile time, uncached and cached."""
    import json

    from vlm_serving.generation.structured import ResponseFormat

    schema = ResponseFormat("json_schema", schema=json.dumps(TYPICAL_SCHEMA))
    base = [request for request, _ in make_requests(generator, shape, 16)]

    def timed(rows: int, response_format: ResponseFormat, lengths: list[int]) -> list[Timing]:
        requests = [(GenerationRequest(r.input_ids, SamplingParams(max_tokens=length, temperature=1.0, seed=i,
                                                                   response_format=response_format),
                                       r.image_embeds, r.language_tensors, r.image_tokens), True)
                    for i, (r, length) in enumerate(zip(base[:rows], lengths))]
        return run_inflight(generator, EngineLimits(max_running=16, cache_tokens=1 << 20), requests, [0.0] * rows)

    rows = []
    for batch in (1, 16):
        progress(f"{family}: constrained against free decoding, batch {batch}")
        ratios, values = [], []
        for _ in range(5):
            constrained = Run(timed(batch, schema, [shape.long_tokens] * batch))
            # The same number of tokens per row, free: the answers' lengths must not decide the ratio.
            free = Run(timed(batch, ResponseFormat(), [timing.tokens for timing in constrained.timings]))
            ratios.append(constrained.tokens_per_s / free.tokens_per_s)
            values.append((constrained.tokens_per_s, free.tokens_per_s))
        median = sorted(range(5), key=lambda i: ratios[i])[2]
        rows.append((f"{family}: tokens/s with a JSON Schema / free text, batch {batch} (sampled, same lengths)",
                     f"{values[median][0]:.0f} / {values[median][1]:.0f} tokens/s", ratios[median], ">= 0.9"))
    compiler = format_compiler(generator)
    started = time.perf_counter()
    compiler.compile(schema)
    uncached = time.perf_counter() - started
    started = time.perf_counter()
    compiler.compile(schema)
    cached = time.perf_counter() - started
    rows.append((f"{family}: compiling a typical JSON Schema (objects with boxes and a caption), cached / uncached",
                 f"{cached * 1000:.3f} / {uncached * 1000:.1f} ms", cached / uncached, "reported"))
    return rows


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(family: str, model, tokenizer, shape: Shape, device: str, count: int) -> list[tuple]:
    generator = BatchGenerator(family, model, tokenizer, device)
    # Random weights rarely end early; an end token would only shorten both sides alike.
    limits = EngineLimits(max_running=shape.max_batch, cache_tokens=shape.max_batch * 4096,
                          prefill_chunk_tokens=512 if device == "cpu" else 2048, max_waiting=count)
    requests = make_requests(generator, shape, count)
    progress(f"{family}: warming up")
    run_inflight(generator, limits, requests[:4], [0.0] * 4)
    run_static(generator, shape.max_batch, requests[:4], [0.0] * 4)

    progress(f"{family}: saturation ({count} requests waiting at the start), static then in flight")
    static = Run(run_static(generator, shape.max_batch, requests, [0.0] * count))
    cache_use = CacheUse()
    inflight = Run(run_inflight(generator, limits, requests, [0.0] * count, cache_use))
    rate = 0.7 * static.requests_per_s
    arrivals = np.cumsum(np.random.default_rng(1).exponential(1 / rate, count)).tolist()
    progress(f"{family}: open loop at {rate:.2f} req/s (70% of static's saturation), static then in flight")
    static_open = Run(run_static(generator, shape.max_batch, requests, arrivals))
    inflight_open = Run(run_inflight(generator, limits, requests, arrivals))
    progress(f"{family}: per-step cost at batch 1")
    engine_s, plain_s = step_overhead(generator, shape, device)
    return constrained_rows(family, generator, shape) + [
        (f"{family}: throughput at saturation, in flight / static",
         f"{inflight.requests_per_s:.2f} / {static.requests_per_s:.2f} req/s; "
         f"{inflight.tokens_per_s:.0f} / {static.tokens_per_s:.0f} tokens/s",
         inflight.requests_per_s / static.requests_per_s, ">= 1.5"),
        (f"{family}: paged cache at saturation: planning the step's slots, share of step time "
         f"(unfilled share of the rows' blocks: {1 - cache_use.real / max(cache_use.slots, 1):.0%})",
         f"{cache_use.cache_seconds:.3f} of {cache_use.step_seconds:.2f} s",
         cache_use.cache_seconds / cache_use.step_seconds, "reported"),
        (f"{family}: p99 latency of short requests at {rate:.2f} req/s, in flight / static",
         f"{inflight_open.short_p99():.2f} / {static_open.short_p99():.2f} s",
         inflight_open.short_p99() / static_open.short_p99(), "<= 0.3"),
        (f"{family}: p99 time to first token at {rate:.2f} req/s, in flight / static",
         f"{inflight_open.first_token_p99():.3f} / {static_open.first_token_p99():.3f} s",
         inflight_open.first_token_p99() / static_open.first_token_p99(), "lower"),
        (f"{family}: time per token of one request alone, engine / plain generate (scheduler cost at batch 1)",
         f"{engine_s * 1000:.2f} / {plain_s * 1000:.2f} ms", engine_s / plain_s, "<= 1.10"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(SHAPES), default="tiny",
                        help="tiny: build/models checkpoints; real: Qwen2.5-VL-7B / Pixtral-12B sizes, random bf16 weights")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--requests", type=int, default=96, help="requests per run")
    parser.add_argument("--family", choices=FAMILIES, action="append", help="one family (repeatable; default both)")
    parser.add_argument("--checkpoints", type=Path, default=REPO_ROOT / "build" / "models")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    shape = SHAPES[args.config]
    torch.manual_seed(0)
    rows = []
    for family in args.family or FAMILIES:
        progress(f"{family}: loading ({args.config}, {args.device})")
        if args.config == "real":
            model, tokenizer = real_model(family, args.device)
        else:
            model = load_model(args.checkpoints / family, "none", args.device)
            tokenizer = load_tokenizer(args.checkpoints / family)
        rows += measure(family, model, tokenizer, shape, args.device, args.requests)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"\nperf.engine --config {args.config} --device {args.device} --requests {args.requests} ({device}, "
          f"torch {torch.__version__}); workload: 4 in 5 short ({shape.short_tokens} tokens), 1 in 5 long "
          f"({shape.long_tokens}), every other with a {shape.image_tokens}-token image")
    width = max(len(row[0]) for row in rows)
    print(f"{'measure'.ljust(width)} | {'values':40} | ratio | goal")
    for name, values, ratio, goal in rows:
        print(f"{name.ljust(width)} | {values:40} | {ratio:6.3f} | {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
