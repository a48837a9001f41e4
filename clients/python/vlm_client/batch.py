"""`vlm batch`: many requests from a folder of images and videos or a JSONL manifest, results as JSONL, resumable.

Every finished item is one complete JSON line, written and flushed at once: a job killed at any
point leaves a file whose lines all parse. Rerunning the same command goes on where it stopped:
the ids already answered are skipped, and those whose line is an error run again (unless
`retry_failed` is off). Their old lines, and a last line a kill tore, are dropped by rewriting the
file whole: a new file renamed over the old one, so a kill at any moment leaves one or the other.
Items that fail become error lines (`error.code`, `error.message`) and the job goes on: a manifest
line with a bad field too, and a file named as a video that is none (vlm_client.videos), never sent.
UNAVAILABLE and RESOURCE_EXHAUSTED are retried with backoff first. A gateway that cannot be reached stops the job (its finished lines stay; rerun to go on).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from vlm.v1 import vlm_pb2

from vlm_client.client import DETAILS, TASKS, AsyncVLMClient, GatewayUnreachable, to_dict
from vlm_client.videos import to_video

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
# A folder's .gif files stay images (most are still pictures); a manifest line sends one as a clip
# when it names it as a "video".
VIDEO_EXTENSIONS = (".mp4", ".webm")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
NUMBER = 'a JSON number, e.g. 0.5 (not "0.5")'
INTEGER = 'a JSON integer, e.g. 64 (not "64")'


class ManifestLine(BaseModel):
    """A manifest line's fields (what it leaves out comes from the command line). Strict: a value of
    another type ("10" for 10, "a.png" for ["a.png"]) is refused, never converted or split."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | int
    images: list[str] | None = Field(None, description='a list of image paths (relative to the manifest) or '
                                     'http(s) URLs, e.g. ["a.png"]; one image may also be "image": "a.png"')
    image: str | None = Field(None, description='one image path or URL, e.g. "a.png"')
    videos: list[str] | None = Field(None, description='a list of video paths (relative to the manifest) or '
                                     'http(s) URLs, e.g. ["a.mp4"]; one video may also be "video": "a.mp4"')
    video: str | None = Field(None, description='one video path or URL, e.g. "a.mp4"')
    # How the line's videos are sampled (unset: the command line's --fps / --max-frames, else the service's).
    fps: float | None = Field(None, gt=0, description="a JSON number greater than 0, e.g. 1 (frames per second)")
    max_frames: int | None = Field(None, gt=0, description="a JSON integer greater than 0, e.g. 16")
    prompt: str | None = None
    model: str | None = None
    task: Literal[TASKS] | None = None
    # GenerationConfig fields and request options.
    max_tokens: int | None = Field(None, description=INTEGER)
    temperature: float | None = Field(None, description=NUMBER)
    top_p: float | None = Field(None, description=NUMBER)
    top_k: int | None = Field(None, description=INTEGER)
    seed: int | None = Field(None, description=INTEGER)
    stop: list[str] | None = Field(None, description='a list of strings, e.g. ["END"]')
    repetition_penalty: float | None = Field(None, description=NUMBER)
    detail: Literal[DETAILS] | None = None


# Per-item parameters a manifest line may set.
PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "detail")
# How a line's videos are sampled (vlm.v1.Video's fields).
VIDEO_OPTIONS = ("fps", "max_frames")


class ManifestError(ValueError):
    """A manifest that cannot run at all (the message names the lines): a line that is not a JSON
    object with an id, or an id on more than one line."""


class OutputError(ValueError):
    """An output file that holds a line other than a result line (the message names it)."""


@dataclass
class BatchItem:
    id: str
    images: list[str]  # paths or http(s) URLs
    prompt: str
    model: str
    task: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # Why the item cannot be sent (a bad manifest line, its fields named): its error line's message;
    # `line` is that manifest line as written, its result line's input.
    problem: str = ""
    line: dict | None = None
    videos: list[str] = field(default_factory=list)  # paths or http(s) URLs
    video_options: dict[str, Any] = field(default_factory=dict)  # VIDEO_OPTIONS for every video of the item

    def as_input(self) -> dict:
        if self.line is not None:
            return {name: value for name, value in self.line.items() if name != "id"}
        videos = {"videos": self.videos, **self.video_options} if self.videos else {}
        return {"images": self.images, **videos, "prompt": self.prompt, "model": self.model, "task": self.task,
                **self.params}


def folder_items(folder: Path, prompt: str, model: str, task: str | None, params: dict,
                 video_options: dict | None = None) -> list[BatchItem]:
    """One item per image or video under `folder` (recursive, by extension: IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS), its id the relative path; `video_options` (VIDEO_OPTIONS) for each video."""
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        kind = path.suffix.lower()
        if kind in IMAGE_EXTENSIONS:
            items.append(BatchItem(str(path.relative_to(folder)), [str(path)], prompt, model, task, dict(params)))
        elif kind in VIDEO_EXTENSIONS:
            items.append(BatchItem(str(path.relative_to(folder)), [], prompt, model, task, dict(params),
                                   videos=[str(path)], video_options=dict(video_options or {})))
    return items


def manifest_items(manifest: Path, prompt: str | None, model: str | None, task: str | None,
                   params: dict, video_options: dict | None = None) -> list[BatchItem]:
    """One item per line (see ManifestLine); relative paths are taken from the manifest's folder.
    Ids are compared as text (1 and "1" are one id). A line that is not a JSON object with an id,
    or an id used twice, is a ManifestError; a line with a bad field is an item with a `problem`."""
    items, lines_of_id = [], {}
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{manifest}:{number}: not JSON ({exc})") from None
        if not isinstance(entry, dict) or not is_id(entry.get("id")):
            raise ManifestError(f'{manifest}:{number}: each line needs an "id": a string or an integer')
        item_id = str(entry["id"])
        lines_of_id.setdefault(item_id, []).append(number)
        items.append(manifest_item(f"{manifest}:{number}", item_id, entry, manifest.parent, prompt, model, task,
                                   params, video_options or {}))
    repeated = [f"{item_id!r} on lines {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"
                for item_id, numbers in lines_of_id.items() if len(numbers) > 1]
    if repeated:
        raise ManifestError(f'{manifest}: ids must be unique, compared as text (1 and "1" are one id): '
                            + "; ".join(repeated))
    return items


def is_id(value: Any) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, int) and not isinstance(value, bool))


def manifest_item(where: str, item_id: str, entry: dict, folder: Path, prompt: str | None, model: str | None,
                  task: str | None, params: dict, video_options: dict) -> BatchItem:
    """The item of one manifest line (`where`: file:line), or, for a line with a bad field, an item
    whose `problem` names the field and what it must be. `video_options`: the command line's, for
    the line's videos where it sets none."""
    problems = []
    try:
        line = ManifestLine.model_validate(entry)
    except ValidationError as error:
        line = None
        for failure in error.errors():
            name = str(failure["loc"][0])
            if failure["type"] == "extra_forbidden":
                problems.append(f'unknown field "{name}" (a line has {", ".join(ManifestLine.model_fields)})')
            else:
                description = ManifestLine.model_fields[name].description
                problems.append(f'"{name}": {failure["msg"]}' + (f"; give {description}" if description else ""))
    if line is not None:
        if line.images is not None and line.image is not None:
            problems.append('give "images" or "image", not both')
        if line.videos is not None and line.video is not None:
            problems.append('give "videos" or "video", not both')
        if (line.fps is not None or line.max_frames is not None) and not (line.videos or line.video):
            problems.append('"fps" and "max_frames" sample the line\'s videos; give "video" or "videos"')
        if not (line.model or model):
            problems.append('no model: give --model or "model"')
    if problems:
        return BatchItem(item_id, [], "", "", problem=f"{where}: " + "; ".join(problems), line=entry)
    def paths(many: list[str] | None, one: str | None) -> list[str]:
        named = many if many is not None else [one] if one is not None else []
        return [name if "://" in name else str(folder / name) for name in named]

    videos = paths(line.videos, line.video)
    return BatchItem(item_id, paths(line.images, line.image), line.prompt if line.prompt is not None else prompt or "",
                     line.model or model, line.task or task,
                     {**params, **line.model_dump(include=set(PARAMETERS), exclude_none=True)}, videos=videos,
                     video_options={**video_options, **line.model_dump(include=set(VIDEO_OPTIONS), exclude_none=True)}
                     if videos else {})


def resume(output: Path, rerun_if_failed: Collection[str]) -> tuple[set[str], set[str]]:
    """(ids `output` answers, ids whose error lines were dropped to run again). A last line torn by
    a kill, and the error lines of the ids in `rerun_if_failed`, leave the file in one atomic rewrite."""
    if not output.exists():
        return set(), set()
    data = output.read_bytes()
    kept, answered, retried = [], set(), set()
    for number, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            item_id = str(record["id"])
        except (ValueError, KeyError, TypeError):
            raise OutputError(f"{output}:{number}: not a result line of vlm batch; give another --output, "
                              "or remove that line") from None
        if "error" in record and item_id in rerun_if_failed:
            retried.add(item_id)
        else:
            kept.append(line)
            answered.add(item_id)
    if b"".join(kept) != data:
        replace_atomically(output, kept)
    return answered, retried


def replace_atomically(path: Path, lines: list[bytes]) -> None:
    """Make `path` hold `lines`: written to a new file beside it, then renamed over it, so that a
    kill at any moment leaves the old file or the new one, whole."""
    new = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with new:
            new.writelines(lines)
            new.flush()
            os.fsync(new.fileno())
        shutil.copymode(path, new.name)
        os.replace(new.name, path)
    except BaseException:
        Path(new.name).unlink(missing_ok=True)
        raise


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    images: int = 0
    videos: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        counts = {"images": self.images, **({"videos": self.videos} if self.videos else {})}
        sent = ", ".join(f"{count} {kind}" for kind, count in counts.items())
        rates = ", ".join(f"{count / self.seconds if self.seconds else 0.0:.2f} {kind}/s"
                          for kind, count in counts.items())
        return (f"done {self.done}, failed {self.failed}, skipped {self.skipped} (already in the output), "
                f"retried {self.retried} (failed before); {sent} in {self.seconds:.1f}s = {rates}")


async def _answer(client: AsyncVLMClient, item: BatchItem, attempts: int, backoff_s: float) -> dict:
    """The result fields of one item's line: the answer's, or an error. GatewayUnreachable is raised."""
    if item.problem:
        return {"error": {"code": "INVALID_ARGUMENT", "message": item.problem}}
    for attempt in range(attempts):
        try:
            videos = [to_video(video, **item.video_options) for video in item.videos]
            answer = await client.generate(item.model, item.prompt or None, item.images, videos=videos,
                                           task=item.task, **item.params)
            break
        except GatewayUnreachable:
            raise
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or attempt == attempts - 1:
                return {"error": {"code": error.code().name, "message": error.details()}}
            await asyncio.sleep(backoff_s * 2**attempt * (0.5 + random.random() / 2))
        except (OSError, ValueError) as error:  # a missing or unreadable file, a file that is not a video
            return {"error": {"code": "INVALID_ARGUMENT", "message": str(error)}}
    kind = answer.WhichOneof("result")
    record = {"text": answer.text, "model": answer.model,
              "finish_reason": vlm_pb2.FinishReason.Name(answer.finish_reason).removeprefix("FINISH_REASON_").lower(),
              "usage": to_dict(answer.usage), "confidence": answer.confidence}
    if kind:
        record["result"] = {kind: to_dict(getattr(answer, kind))}
    if answer.result_error:
        record["result_error"] = answer.result_error
    return record


async def run_batch(client: AsyncVLMClient, items: list[BatchItem], output: Path, concurrency: int = 8,
                    attempts: int = 4, backoff_s: float = 0.5, retry_failed: bool = True,
                    progress: bool = True) -> Summary:
    """Run every item `output` does not answer yet (see `resume`), at most `concurrency` at once;
    append one line each. An unreachable gateway (GatewayUnreachable) stops the job, before the
    output is touched if it is so from the start."""
    from tqdm import tqdm

    await client.wait_connected()
    answered, retried = resume(output, {item.id for item in items} if retry_failed else ())
    todo = [item for item in items if item.id not in answered]
    summary = Summary(skipped=len(items) - len(todo), retried=len(retried))
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
                    summary.videos += len(item.videos)
                bar.set_postfix(failed=summary.failed, refresh=False)
                bar.update(1)

        workers = [asyncio.ensure_future(worker()) for _ in range(max(1, concurrency))]
        try:
            await asyncio.gather(*workers)
        finally:  # one worker's failure (the gateway gone) ends the others' too
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            summary.seconds = time.perf_counter() - started
    return summary
