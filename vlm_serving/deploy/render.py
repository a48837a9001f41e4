"""Render the model repository's `config.pbtxt` files for a deployment profile.

    python -m vlm_serving.deploy.render --profile cpu
    python -m vlm_serving.deploy.render --profile gpu --gpus 0,1 --quantization bnb-nf4

One template per model role (`templates/{preprocess,embed,encoder,generate,ensemble}.pbtxt`) is
filled in for each family and profile, so the CPU and GPU repositories can never drift apart. The
rendered files are build outputs (git-ignored) beside the committed `model.py` files.

Each family's pipeline (its ensemble): preprocess -> embed -> generate. The embed step answers
from its cache of image embeddings and sends only the images it has not seen to the family's
encoder model (ONNX Runtime), which batches them apart from the language model.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import Template

import numpy as np

from vlm_serving.checkpoint_config import checkpoint_context_tokens
from vlm_serving.encoding.encoder import VARIANTS
from vlm_serving.encoding.encoder_inputs import SPECS
from vlm_serving.generation.sampling import SamplingDefaults
from vlm_serving.generation.scheduling import SCHEDULERS, EngineLimits
from vlm_serving.pipelines import FAMILIES, ROUTER
from vlm_serving.preprocessing.resolution import ImageDetail, ResolutionPresets
from vlm_serving.routing import DEFAULT_CONFIDENCE_THRESHOLD

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = Path(__file__).resolve().parent / "templates"

_TRITON_TYPES = {np.float32: "TYPE_FP32", np.int64: "TYPE_INT64", np.int32: "TYPE_INT32"}


def encoder_tensors(family: str) -> list[tuple[str, str, str]]:
    """(name, Triton type, dims) of the encoder's inputs: its graph inputs for a request's images,
    packed, and IMAGE_LAYOUT (entries per image of each), see vlm_serving.encoding.encoder_inputs."""
    spec = SPECS[family]
    tensors = [
        (entry.name.upper(), _TRITON_TYPES[entry.dtype], ", ".join(str(d) for d in (-1, *entry.row_dims)))
        for entry in spec
    ]
    return tensors + [("IMAGE_LAYOUT", "TYPE_INT64", f"-1, {len(spec)}")]


# What the language model takes about the images besides their embeddings.
# Qwen2.5-VL's 3-D positions: each image's and clip's grid, and each clip's seconds per temporal patch.
LANGUAGE_IMAGE_TENSORS = {
    "qwen2_5_vl": [("IMAGE_GRID_THW", "TYPE_INT64", "-1, 3"), ("VIDEO_GRID_THW", "TYPE_INT64", "-1, 3"),
                   ("SECOND_PER_GRID_TS", "TYPE_FP32", "-1")],
    "pixtral": [],
}
# Optional for the generate model: a direct call without clips (perf_analyzer, a caller of the step) leaves them out.
CLIP_TENSORS = ("VIDEO_GRID_THW", "SECOND_PER_GRID_TS")
IMAGE_EMBEDS = [("IMAGE_EMBEDS", "TYPE_FP32", "-1, -1")]
# Which encoder computed the embeddings (model/version/variant/weights mtime), for the cache.
ENCODER_IDENTITY = [("ENCODER_IDENTITY", "TYPE_STRING", "1")]
# Every per-request parameter is optional; the defaults are `SamplingParams`'. REQUEST_ID names
# the request for cancellation (see vlm_serving/generation/cancellation.py).
REQUEST_PARAMETERS = [
    ("MAX_TOKENS", "TYPE_INT32", "1"),
    ("TEMPERATURE", "TYPE_FP32", "1"),
    ("TOP_P", "TYPE_FP32", "1"),
    ("TOP_K", "TYPE_INT32", "1"),
    ("SEED", "TYPE_INT64", "1"),
    ("STOP", "TYPE_STRING", "-1"),
    ("REPETITION_PENALTY", "TYPE_FP32", "1"),
    ("PRESENCE_PENALTY", "TYPE_FP32", "1"),
    ("FREQUENCY_PENALTY", "TYPE_FP32", "1"),
    # true: every response carries its tokens' log-probabilities in TOKEN_LOGPROBS.
    ("LOGPROBS", "TYPE_BOOL", "1"),
    ("TOP_LOGPROBS", "TYPE_INT32", "1"),
    ("STREAM", "TYPE_BOOL", "1"),
    ("REQUEST_ID", "TYPE_STRING", "1"),
    # The answer's shape (vlm_serving/generation/structured.py; empty or absent: free text).
    ("RESPONSE_FORMAT", "TYPE_STRING", "1"),
    # Stream migration: the token ids of the answer that another server delivered before it failed
    # (the TOKEN_IDS of its responses, in order); generation goes on after them, STREAM true only.
    ("CONTINUATION", "TYPE_INT64", "-1"),
]
# Model auto takes no CONTINUATION: its fallback asks two families, and a continuation is one
# family's answer; an answer of auto's is continued on the family that gave it (its ROUTE_INFO).
ROUTER_PARAMETERS = [tensor for tensor in REQUEST_PARAMETERS if tensor[0] != "CONTINUATION"]
RESPONSE_TENSORS = [
    ("TEXT", "TYPE_STRING", "1"),
    ("TOKEN_IDS", "TYPE_INT64", "-1"),
    ("FINISH_REASON", "TYPE_STRING", "1"),
    ("PROMPT_TOKENS", "TYPE_INT32", "1"),
    ("COMPLETION_TOKENS", "TYPE_INT32", "1"),
    ("IMAGE_TOKENS", "TYPE_INT32", "1"),
    # Prompt tokens found in the engine's prefix cache (RequestUpdate.cached_tokens).
    ("CACHED_TOKENS", "TYPE_INT32", "1"),
    ("CONFIDENCE", "TYPE_FP32", "1"),
    ("MODEL_VERSION", "TYPE_STRING", "1"),
    ("IMAGE_INFO", "TYPE_STRING", "1"),
    # UTF-8 JSON, with LOGPROBS: one {"token", "bytes", "logprob", "top_logprobs"} per token of
    # TOKEN_IDS (the end-of-sequence token has none). Only in the responses of requests that ask
    # (and that carry tokens): the ensembles and `auto` pass on responses without it.
    ("TOKEN_LOGPROBS", "TYPE_STRING", "1"),
]


@dataclass(frozen=True)
class Batching:
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    # Requests beyond this many waiting are refused at once (overload is an error, not a wait).
    max_queue_size: int


@dataclass(frozen=True)
class Profile:
    """Where and how many instances of each model run."""

    name: str
    kind: str  # KIND_CPU or KIND_GPU for the generation models
    gpus: tuple[int, ...] = ()
    # None: from the cores the renderer may use (preprocess_instances below).
    preprocess_instances: int | None = None
    generate_instances: int = 1  # per GPU on the GPU profile
    encoder_instances: int = 1  # per GPU on the GPU profile
    quantization: str = "none"
    # fp32 (CPU default: embeddings as transformers computes them), int8 (CPU), fp16 (CUDA).
    encoder_variant: str = "fp32"
    # Bytes of image embeddings the embed step keeps (0: no cache).
    encoder_cache_bytes: int = 1 << 30
    preprocess_batching: Batching = Batching(16, (4, 8, 16), 1000, 128)
    # Every request passes the embed step (text-only ones straight through): a short wait.
    embed_batching: Batching = Batching(16, (4, 8, 16), 200, 128)
    encoder_batching: Batching = Batching(16, (4, 8, 16), 2000, 128)
    generate_batching: Batching = Batching(16, (8, 16), 5000, 64)
    # inflight (requests join and leave the running batch at every step, within `engine`) or
    # static (one `generate` per dynamic batch, `generate_batching`): generation/scheduling.py.
    scheduler: str = "inflight"
    engine: EngineLimits = EngineLimits()
    checkpoints_dir: Path = field(default=REPO_ROOT / "build" / "models")
    max_tokens_limit: int = 4096
    max_images: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # All images of one request together, from their headers, before any is decoded.
    max_request_pixels: int = 64_000_000
    # Video clips (vlm_serving/preprocessing/video.py checks the rest of VideoLimits: length, frame size, pixels).
    max_videos: int = 4
    max_video_bytes: int = 64 * 1024 * 1024
    # Which versions of each model serve: "latest:N", "all" or "specific:1,2".
    version_policy: str = "latest:1"
    # The router's default confidence threshold (mean log-probability per token; see routing.py).
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    router_max_concurrent_requests: int = 64
    # Pixel ranges per image kind, and per family the detail requests get when they name none.
    resolution_presets: ResolutionPresets = ResolutionPresets()
    image_detail: dict[str, ImageDetail] = field(default_factory=dict)


PROFILES = {
    "cpu": Profile(name="cpu", kind="KIND_CPU"),
    "gpu": Profile(
        name="gpu",
        kind="KIND_GPU",
        gpus=(0,),
        encoder_variant="fp16",
        generate_batching=Batching(32, (8, 16, 32), 5000, 256),
        # Qwen2.5-VL-7B in bf16 keeps 56 KiB of keys and values per token: 262144 tokens = 14 GiB.
        engine=EngineLimits(max_running=64, cache_tokens=262144, prefill_chunk_tokens=2048, max_waiting=256),
    ),
}


# The share of the cores the preprocessing instances get by default: on the CPU profile the encoders and
# the language models compute on the same cores; on the GPU profile the rest is for Triton, the embed step
# and the gateway. Each instance is a process that keeps about one core busy (perf/scaling_row.py, rows 20)
# and sizes its image threads to its share (preprocess.image_threads): instances x threads ~ cores.
PREPROCESS_CORE_SHARE = {"KIND_CPU": 0.5, "KIND_GPU": 0.75}
# Two at least: one request with a large image never holds all of preprocessing.
MIN_PREPROCESS_INSTANCES = 2


def preprocess_instances(profile: Profile, cores: int | None = None) -> int:
    """The profile's preprocessing instance count, or by default its share of `cores` (default: the
    cores this process may run on, its CPU affinity: render where the server runs, or set the count)."""
    if profile.preprocess_instances is not None:
        return profile.preprocess_instances
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(MIN_PREPROCESS_INSTANCES, int(cores * PREPROCESS_CORE_SHARE[profile.kind]))


def _tensors(tensors, optional: bool = False, ragged: bool = False) -> str:
    blocks = []
    for name, dtype, dims in tensors:
        lines = [f'    name: "{name}"', f"    data_type: {dtype}", f"    dims: [ {dims} ]"]
        if optional:
            lines.append("    optional: true")
        if ragged:
            lines.append("    allow_ragged_batch: true")
        blocks.append("  {\n" + "\n".join(lines) + "\n  }")
    return ",\n".join(blocks)


def _maps(kind: str, tensors, internal: bool) -> str:
    prefix = "_" if internal else ""
    return "\n".join(f'      {kind} {{ key: "{name}" value: "{prefix}{name}" }}' for name, _, _ in tensors)


def _dynamic_batching(batching: Batching) -> str:
    sizes = ", ".join(str(size) for size in batching.preferred_batch_sizes)
    return (
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {sizes} ]\n" if sizes else "")
        + f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n"
        f"  default_queue_policy {{ max_queue_size: {batching.max_queue_size} }}\n"
        "}"
    )


def generate_batching(profile: Profile) -> Batching:
    """The generation model's dynamic batching. In flight, `execute` only hands requests to the
    instance's engine: Triton holds none back (no delay, no preferred sizes), the engine's bounded
    queue does the waiting."""
    if profile.scheduler == "static":
        return profile.generate_batching
    return replace(profile.generate_batching, preferred_batch_sizes=(), max_queue_delay_us=0)


def _instance_group(count: int, kind: str, gpus: tuple[int, ...] = ()) -> str:
    gpu_list = f" gpus: [ {', '.join(str(g) for g in gpus)} ]" if kind == "KIND_GPU" else ""
    return f"instance_group [ {{ count: {count} kind: {kind}{gpu_list} }} ]"


def _version_policy(policy: str) -> str:
    kind, _, value = policy.partition(":")
    if kind == "latest" and value.isdigit() and int(value) > 0:
        return f"version_policy: {{ latest {{ num_versions: {value} }} }}"
    if kind == "all" and not value:
        return "version_policy: { all { } }"
    if kind == "specific" and value and all(v.strip().isdigit() for v in value.split(",")):
        return f"version_policy: {{ specific {{ versions: [ {', '.join(v.strip() for v in value.split(','))} ] }} }}"
    raise ValueError(f"version policy {policy!r}: use latest:N, all or specific:1,2")


def render_family(family: str, profile: Profile) -> dict[str, str]:
    """{model name: config.pbtxt text} for one family's five models."""
    encoder_inputs = encoder_tensors(family)
    language_tensors = LANGUAGE_IMAGE_TENSORS[family]
    checkpoint = str(profile.checkpoints_dir / family)
    common = {"family": family, "checkpoint": checkpoint, "version_policy": _version_policy(profile.version_policy)}

    def fill(template: str, **values) -> str:
        return Template((TEMPLATES / template).read_text()).substitute(common, **values)

    def maps(kind: str, tensors) -> str:
        return _maps(kind, tensors, internal=True)

    preprocess = fill(
        "preprocess.pbtxt",
        name=f"{family}_preprocess",
        max_batch_size=profile.preprocess_batching.max_batch_size,
        image_tensors=_tensors(encoder_inputs + language_tensors) + ",",
        max_images=profile.max_images,
        max_image_bytes=profile.max_image_bytes,
        max_image_pixels=profile.max_image_pixels,
        max_request_pixels=profile.max_request_pixels,
        max_videos=profile.max_videos,
        max_video_bytes=profile.max_video_bytes,
        resolution_presets=replace(profile.resolution_presets,
                                   default_detail=profile.image_detail.get(family, ImageDetail.AUTO)).to_json(),
        dynamic_batching=_dynamic_batching(profile.preprocess_batching),
        # Image decoding and tokenization are CPU work on every profile.
        instance_group=_instance_group(preprocess_instances(profile), "KIND_CPU"),
    )
    embed = fill(
        "embed.pbtxt",
        name=f"{family}_embed",
        encoder=f"{family}_encoder",
        max_batch_size=profile.embed_batching.max_batch_size,
        encoder_inputs=_tensors(encoder_inputs, ragged=True),
        image_embeds=_tensors(IMAGE_EMBEDS),
        cache_bytes=profile.encoder_cache_bytes,
        dynamic_batching=_dynamic_batching(profile.embed_batching),
        # One instance: one cache, shared by every request.
        instance_group=_instance_group(1, "KIND_CPU"),
    )
    encoder = fill(
        "encoder.pbtxt",
        name=f"{family}_encoder",
        max_batch_size=profile.encoder_batching.max_batch_size,
        encoder_inputs=_tensors(encoder_inputs, ragged=True),
        outputs=_tensors(IMAGE_EMBEDS + ENCODER_IDENTITY),
        variant=profile.encoder_variant,
        dynamic_batching=_dynamic_batching(profile.encoder_batching),
        instance_group=_instance_group(profile.encoder_instances, profile.kind, profile.gpus),
    )
    generate = fill(
        "generate.pbtxt",
        name=f"{family}_generate",
        max_batch_size=profile.generate_batching.max_batch_size,
        image_tensors=",\n".join(filter(None, [
            _tensors(IMAGE_EMBEDS + [t for t in language_tensors if t[0] not in CLIP_TENSORS], ragged=True),
            _tensors([t for t in language_tensors if t[0] in CLIP_TENSORS], optional=True, ragged=True)])) + ",",
        request_parameters=_tensors(REQUEST_PARAMETERS, optional=True, ragged=True),
        response_tensors=_tensors(RESPONSE_TENSORS),
        quantization=profile.quantization,
        max_tokens_limit=profile.max_tokens_limit,
        sampling_defaults=SamplingDefaults.of_checkpoint(checkpoint).to_json(),
        context_tokens=checkpoint_context_tokens(checkpoint),
        scheduler=profile.scheduler,
        engine_parameters="\n".join(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
                                     for key, value in profile.engine.to_parameters().items()),
        dynamic_batching=_dynamic_batching(generate_batching(profile)),
        instance_group=_instance_group(profile.generate_instances, profile.kind, profile.gpus),
    )
    ensemble = Template((TEMPLATES / "ensemble.pbtxt").read_text()).substitute(
        name=family,
        # The ensemble can take no larger batch than its smallest step.
        max_batch_size=min(
            profile.preprocess_batching.max_batch_size,
            profile.embed_batching.max_batch_size,
            profile.generate_batching.max_batch_size,
        ),
        request_parameters=_tensors(REQUEST_PARAMETERS, optional=True),
        response_tensors=_tensors(RESPONSE_TENSORS),
        preprocess_outputs=maps("output_map", encoder_inputs + language_tensors),
        embed_inputs=maps("input_map", encoder_inputs),
        generate_image_inputs=maps("input_map", IMAGE_EMBEDS + language_tensors),
        parameter_input_map=_maps("input_map", REQUEST_PARAMETERS, internal=False),
        response_output_map=_maps("output_map", RESPONSE_TENSORS, internal=False),
    )
    return {
        f"{family}_preprocess": preprocess,
        f"{family}_embed": embed,
        f"{family}_encoder": encoder,
        f"{family}_generate": generate,
        family: ensemble,
    }


def copy_model_code(source: Path, target: Path) -> Path:
    """Each model's tracked version folder (`1/`, its `model.py`) from `source` into `target`, and
    nothing else: version folders shipped into a working tree, their weights and hand-edited
    configs stay behind (the tests and benchmarks render their own configs)."""
    import shutil

    for model in sorted(path for path in source.iterdir() if path.is_dir()):
        shutil.copytree(model / "1", target / model.name / "1", ignore=shutil.ignore_patterns("__pycache__", "checkpoint"))
    return target


def render_router(profile: Profile) -> str:
    return Template((TEMPLATES / "auto.pbtxt").read_text()).substitute(
        max_batch_size=min(profile.preprocess_batching.max_batch_size, profile.generate_batching.max_batch_size),
        version_policy=_version_policy(profile.version_policy),
        request_parameters=_tensors(ROUTER_PARAMETERS, optional=True),
        response_tensors=_tensors(RESPONSE_TENSORS),
        confidence_threshold=f"{profile.confidence_threshold:.6g}",
        max_concurrent_requests=profile.router_max_concurrent_requests,
    )


def render_repository(repository: Path, profile: Profile) -> list[Path]:
    written = []
    configs = {"cancel": (TEMPLATES / "cancel.pbtxt").read_text(), ROUTER: render_router(profile)}
    for family in FAMILIES:
        configs.update(render_family(family, profile))
    for model, text in configs.items():
        path = repository / model / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render model_repository/*/config.pbtxt for a profile.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--checkpoints", type=Path, help="folder holding one checkpoint folder per family")
    parser.add_argument("--gpus", help="comma-separated GPU ids for the gpu profile, e.g. 0,1")
    parser.add_argument("--quantization", help="none, int8 (CPU), bnb-int8, bnb-nf4 or awq (GPU)")
    parser.add_argument("--preprocess-instances", type=int,
                        help="preprocessing instances (default: from the cores this machine lets the renderer use)")
    parser.add_argument("--generate-instances", type=int, help="generation instances (per GPU on gpu)")
    parser.add_argument("--encoder-instances", type=int, help="vision encoder instances (per GPU on gpu)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="generation scheduling (default inflight)")
    parser.add_argument("--max-running", type=int, help="in flight: rows decoded together per generation instance")
    parser.add_argument("--cache-tokens", type=int, help="in flight: key/value-cache budget in tokens per instance")
    parser.add_argument("--prefill-chunk-tokens", type=int, help="in flight: prompt tokens prefilled per step")
    parser.add_argument("--block-tokens", type=int, help="in flight: token slots per block of the paged cache (default 16)")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction,
                        help="in flight: keep prompts' full blocks for later requests with the same beginning "
                             "(default on)")
    parser.add_argument("--encoder-variant", choices=VARIANTS, help="ONNX encoder variant")
    parser.add_argument("--encoder-cache-mib", type=int, help="image embedding cache size (0: off; default 1024)")
    parser.add_argument("--version-policy", help="versions that serve: latest:N (default latest:1), all, specific:1,2")
    parser.add_argument("--image-detail", action="append", default=[], metavar="[FAMILY=]DETAIL",
                        help="the detail (auto, low, high) requests get when they name none, for every family "
                             "or one (repeatable; default auto)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.checkpoints:
        profile = replace(profile, checkpoints_dir=args.checkpoints.resolve())
    if args.gpus:
        profile = replace(profile, gpus=tuple(int(g) for g in args.gpus.split(",")))
    if args.quantization:
        profile = replace(profile, quantization=args.quantization)
    if args.preprocess_instances is not None:
        if args.preprocess_instances < 1:
            parser.error(f"--preprocess-instances {args.preprocess_instances}: use 1 or more")
        profile = replace(profile, preprocess_instances=args.preprocess_instances)
    if args.generate_instances:
        profile = replace(profile, generate_instances=args.generate_instances)
    if args.encoder_instances:
        profile = replace(profile, encoder_instances=args.encoder_instances)
    if args.scheduler:
        profile = replace(profile, scheduler=args.scheduler)
    engine = {key: value for key, value in (("max_running", args.max_running), ("cache_tokens", args.cache_tokens),
                                             ("prefill_chunk_tokens", args.prefill_chunk_tokens),
                                             ("block_tokens", args.block_tokens)) if value}
    if args.prefix_caching is not None:
        engine["prefix_caching"] = args.prefix_caching
    profile = replace(profile, engine=replace(profile.engine, **engine))
    if args.encoder_variant:
        profile = replace(profile, encoder_variant=args.encoder_variant)
    if args.encoder_cache_mib is not None:
        profile = replace(profile, encoder_cache_bytes=args.encoder_cache_mib << 20)
    if args.version_policy:
        profile = replace(profile, version_policy=args.version_policy)
    details = {}
    for setting in args.image_detail:
        family, _, detail = setting.rpartition("=")
        for name in [family] if family else FAMILIES:
            if name not in FAMILIES:
                parser.error(f"--image-detail {setting}: unknown family {name!r}; known: {', '.join(FAMILIES)}")
            try:
                details[name] = ImageDetail(detail)
            except ValueError:
                parser.error(f"--image-detail {setting}: {detail!r} is not one of auto, low, high")
    profile = replace(profile, image_detail=details)
    for path in render_repository(args.repository, profile):
        print(f"rendered {path.relative_to(args.repository.parent) if path.is_relative_to(args.repository.parent) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
