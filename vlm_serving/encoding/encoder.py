"""Run an exported vision encoder with ONNX Runtime, and cache what it computed.

`OnnxEncoder` runs any number of images (from any number of requests) as one graph call.
`EmbeddingCache` keeps image embeddings by content hash and encoder identity, bounded in bytes,
least recently used out first. `EncoderChanges` tells the cache front that the encoder was
reloaded (new version, new weights, other variant, rollback), which invalidates the cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_serving.encoding.encoder_inputs import OUTPUT_NAME, SPECS, ImageInputs, graph_inputs, image_digest, pack, split_per_image

VARIANTS = ("fp32", "int8", "fp16")


def encoder_file(onnx_dir: str | Path, variant: str) -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"encoder variant {variant!r}: use one of {', '.join(VARIANTS)}")
    path = Path(onnx_dir) / f"encoder.{variant}.onnx"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; export it with `python -m vlm_serving.encoding.encoder_export <checkpoint> --variants {variant}`"
        )
    return path


class OnnxEncoder:
    """One ONNX Runtime session of a family's encoder (CUDA provider first on a GPU device)."""

    def __init__(self, family: str, onnx_dir: str | Path, variant: str = "fp32", device: str = "cpu",
                 threads: int = 0, patches_per_call: int = 1024):
        import onnxruntime as ort

        self.family = family
        self.spec = SPECS[family]
        self.path = encoder_file(onnx_dir, variant)
        self.variant = variant
        self.patches_per_call = patches_per_call
        metadata = json.loads((Path(onnx_dir) / "encoder.json").read_text())
        if metadata["family"] != family:
            raise ValueError(f"{onnx_dir} holds a {metadata['family']} encoder, not {family}")
        self.hidden_size = int(metadata["hidden_size"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        if device.startswith("cuda"):
            device_id = int(device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.providers = self.session.get_providers()

    def encode(self, images: list[ImageInputs]) -> list[np.ndarray]:
        """float32 [tokens, hidden] per image, in order.

        Images run together in calls of at most `patches_per_call` patches (an image larger than
        that runs alone): small images gain from sharing one call's matrix products, which are
        about as efficient as they get at a thousand rows, while a call's attention pads every
        image to its largest and its activations grow with its patches.
        """
        results: list[np.ndarray] = []
        group: list[ImageInputs] = []
        patches = 0
        for image in images:
            size = len(image["pixel_values"])
            if group and patches + size > self.patches_per_call:
                results += self._run(group)
                group, patches = [], 0
            group.append(image)
            patches += size
        return results + (self._run(group) if group else [])

    def _run(self, images: list[ImageInputs]) -> list[np.ndarray]:
        packed = pack(images, self.spec)
        (embeddings,) = self.session.run([OUTPUT_NAME], graph_inputs(packed.tensors))
        return split_per_image(embeddings.astype(np.float32, copy=False), images, self.family)


def encode_each_request(encode, requests: list[list[ImageInputs]]) -> list[list[np.ndarray] | Exception]:
    """Every request's embeddings from one `encode` call over all their images; if that call fails
    (one huge image running out of memory, say), each request is encoded on its own, so the
    failure stays with the requests that cause it."""
    try:
        embeddings = encode([image for images in requests for image in images])
    except Exception as exc:
        if len(requests) == 1:
            return [exc]
        answers: list[list[np.ndarray] | Exception] = []
        for images in requests:
            try:
                answers.append(encode(images))
            except Exception as exc:
                answers.append(exc)
        return answers
    answers, start = [], 0
    for images in requests:
        answers.append(embeddings[start : start + len(images)])
        start += len(images)
    return answers


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class EmbeddingCache:
    """Image embeddings by (encoder identity, image digest), at most `max_bytes`, LRU eviction."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()

    def get(self, identity: str, digest: bytes) -> np.ndarray | None:
        value = self.entries.get((identity, digest))
        if value is None:
            self.stats.misses += 1
            return None
        self.entries.move_to_end((identity, digest))
        self.stats.hits += 1
        return value

    def put(self, identity: str, digest: bytes, value: np.ndarray) -> None:
        key = (identity, digest)
        if value.nbytes > self.max_bytes or key in self.entries:
            return
        # An owned copy: a view (one image's slice of a call's output) would pin the whole output
        # while only its slice is counted.
        value = np.array(value, copy=True)
        value.setflags(write=False)  # shared by every request that hits it
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.stats.evictions += 1

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


# Encodes images (one call), answering their embeddings and the identity of the encoder that ran.
EncodeCall = Callable[[list[ImageInputs]], Awaitable[tuple[list[np.ndarray], str]]]


async def embed_batch(
    requests: list[list[ImageInputs]], cache: EmbeddingCache, identity: str, encode: EncodeCall,
    cache_hits: list[int] | None = None,
) -> list[np.ndarray | Exception]:
    """float32 [image tokens, hidden] per request ([0, 0] without images): cached images from the
    cache, the others encoded.

    One encode call per request that has unseen images, all in flight together (the encoder model
    batches them); an image that several requests of the batch share is encoded once. A failed
    call fails only the requests that needed it. `cache_hits`, when given, gets each request's
    number of images found in the cache (the others are encoded).
    """
    digests = [[image_digest(image) for image in images] for images in requests]
    found: list[list[np.ndarray | None]] = [[cache.get(identity, d) for d in ds] for ds in digests]
    if cache_hits is not None:
        cache_hits[:] = [sum(hit is not None for hit in hits) for hits in found]
    calls: list[list[ImageInputs]] = []
    call_digests: list[list[bytes]] = []
    owner: dict[bytes, int] = {}  # digest -> the call that encodes it
    for images, ds, hits in zip(requests, digests, found):
        unseen = [(image, d) for image, d, hit in zip(images, ds, hits) if hit is None and d not in owner]
        if unseen:
            for _, d in unseen:
                owner[d] = len(calls)
            calls.append([image for image, _ in unseen])
            call_digests.append([d for _, d in unseen])
    results = await asyncio.gather(*(encode(images) for images in calls), return_exceptions=True)
    encoded: dict[bytes, np.ndarray] = {}
    for ds, result in zip(call_digests, results):
        if isinstance(result, BaseException):
            continue
        embeddings, encoder = result
        for d, embedding in zip(ds, embeddings):
            encoded[d] = embedding
            cache.put(encoder, d, embedding)
    answers: list[np.ndarray | Exception] = []
    for ds, hits in zip(digests, found):
        rows = [hit if hit is not None else encoded.get(d) for d, hit in zip(ds, hits)]
        if any(row is None for row in rows):
            failed = next(results[owner[d]] for d, row in zip(ds, rows) if row is None)
            answers.append(failed if isinstance(failed, Exception) else RuntimeError(str(failed)))
        else:
            answers.append(np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32))
    return answers


class EncoderChanges:
    """A marker per encoder model, changed whenever one of its instances loads or unloads.

    The cache front clears its cache when the marker changes: whatever version, weights or variant
    serves after a reload (a rollback included), no embedding of the encoder before it is used.
    Shared by the processes of one Triton server: a file per model name under /dev/shm, named
    after the Triton server process (the parent of every Python stub).
    """

    def __init__(self, server_pid: int | None = None):
        root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
        self.directory = root / f"vlm-encoders-{os.getppid() if server_pid is None else server_pid}"

    def mark(self, model_name: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = self.directory / f".{model_name}.{os.getpid()}"
        staging.write_text(f"{time.time_ns()} {os.getpid()} {id(self)}")
        os.replace(staging, self.directory / model_name)

    def current(self, model_name: str) -> str:
        # Read every time (a few microseconds on tmpfs): file times are too coarse to tell two
        # changes in quick succession apart.
        try:
            return (self.directory / model_name).read_text()
        except FileNotFoundError:
            return ""


def encoder_identity(model_name: str, version: int, encoder: OnnxEncoder) -> str:
    return f"{model_name}/{version}/{encoder.variant}/{encoder.path.stat().st_mtime_ns}"
