"""`vlm batch`: many requests from a folder of images or a JSONL manifest, results as JSONL, resumable.

Every finished item is one complete JSON line, written and flushed at once: a job killed at any
point leaves a file whose lines all parse (a line torn by a kill mid-write is cut off on resume).
Rerunning the same command skips the ids already in the output and appends the rest. Items that
fail become error lines (`error.code`, `error.message`) and the job goes on; UNAVAILABLE and
RESOURCE_EXHAUSTED are retried with backoff first.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from vlm.v1 import vlm_pb2

from vlm_client.client import AsyncVLMClient

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# Per-item parameters a manifest line may set (GenerationConfig fields and request options).
PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "detail")


class ManifestError(ValueError):
    """A manifest line that cannot be run (the message names the line)."""


@dataclass
class BatchItem:
    id: str
    images: list[str]  # paths or http(s) URLs
    prompt: str
    model: str
    task: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def as_input(self) -> dict:
        return {"images": self.images, "prompt": self.prompt, "model": self.model, "task": self.task, **self.params}


def folder_items(folder: Path, prompt: str, model: str, task: str | None, params: dict) -> list[BatchItem]:
    """One item per image under `folder` (recursive, by extension), its id the relative path."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [BatchItem(str(path.relative_to(folder)), [str(path)], prompt, model, task, dict(params)) for path in paths]


def manifest_items(manifest: Path, prompt: str | None, model: str | None, task: str | None,
                   params: dict) -> list[BatchItem]:
    """One item per line: {"id", "images": [paths or URLs] (or "image"), "prompt", "model", "task",
    parameters}; what a line leaves out comes from the command line. Relative paths are taken from
    the manifest's folder."""
    items, seen = [], set()
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{manifest}:{number}: not JSON ({exc})") from None
        if not isinstance(entry, dict) or not str(entry.get("id", "")).strip():
            raise ManifestError(f"{manifest}:{number}: each line needs an \"id\"")
        if entry["id"] in seen:
            raise ManifestError(f"{manifest}:{number}: id {entry['id']!r} repeats")
        seen.add(entry["id"])
        images = entry.get("images", [entry["image"]] if "image" in entry else [])
        images = [image if "://" in image else str((manifest.parent / image)) for image in images]
        chosen_model = entry.get("model", model)
        if not chosen_model:
            raise ManifestError(f"{manifest}:{number}: no model (give --model or \"model\")")
        unknown = set(entry) - {"id", "images", "image", "prompt", "model", "task", *PARAMETERS}
        if unknown:
            raise ManifestError(f"{manifest}:{number}: unknown field(s) {', '.join(sorted(unknown))}")
        items.append(BatchItem(str(entry["id"]), images, entry.get("prompt", prompt or ""), chosen_model,
                               entry.get("task", task), {**params, **{k: entry[k] for k in PARAMETERS if k in entry}}))
    return items


def finished_ids(output: Path) -> set[str]:
    """Ids already in `output`; a last line torn by a kill is cut off first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        with output.open("r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    return {json.loads(line)["id"] for line in data.decode().splitlines() if line.strip()}


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    images: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        return (f"done {self.done}, failed {self.failed}, skipped {self.skipped} (already in the output); "
                f"{self.images} images in {self.seconds:.1f}s = {rate:.2f} images/s")


async def _answer(client: AsyncVLMClient, item: BatchItem, attempts: int, backoff_s: float) -> dict:
    params = dict(item.params)
    for attempt in range(attempts):
        try:
            answer = await client.generate(item.model, item.prompt or None, item.images, task=item.task, **params)
            break
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE or attempt == attempts - 1:
                return {"error": {"code": error.code().name, "message": error.details()}}
            await asyncio.sleep(backoff_s * 2**attempt * (0.5 + random.random() / 2))
        except (OSError, ValueError) as error:  # a missing or unreadable image file, say
            return {"error": {"code": "INVALID_ARGUMENT", "message": str(error)}}
    kind = answer.WhichOneof("result")
    record = {"text": answer.text, "model": answer.model,
              "finish_reason": vlm_pb2.FinishReason.Name(answer.finish_reason).removeprefix("FINISH_REASON_").lower(),
              "usage": json_format.MessageToDict(answer.usage, preserving_proto_field_name=True),
              "confidence": answer.confidence}
    if kind:
        record["result"] = {kind: json_format.MessageToDict(getattr(answer, kind), preserving_proto_field_name=True)}
    if answer.result_error:
        record["result_error"] = answer.result_error
    return record


async def run_batch(client: AsyncVLMClient, items: list[BatchItem], output: Path, concurrency: int = 8,
                    attempts: int = 4, backoff_s: float = 0.5, progress: bool = True) -> Summary:
    """Run every item not yet in `output`, at most `concurrency` at once; append one line each."""
    from tqdm import tqdm

    done_before = finished_ids(output)
    todo = [item for item in items if item.id not in done_before]
    summary = Summary(skipped=len(items) - len(todo))
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    started = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as out, tqdm(total=len(todo), unit="item", disable=not progress,
                                                         file=sys.stderr, dynamic_ncols=True) as bar:
        async def worker():
            while not queue.empty():
                item = queue.get_nowait()
                record = {"id": item.id, "input": item.as_input(), **await _answer(client, item, attempts, backoff_s)}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")  # one whole line, then flushed
                out.flush()
                if "error" in record:
                    summary.failed += 1
                else:
                    summary.done += 1
                    summary.images += len(item.images)
                bar.set_postfix(failed=summary.failed, refresh=False)
                bar.update(1)

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        finally:
            summary.seconds = time.perf_counter() - started
    return summary
