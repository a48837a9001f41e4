"""`vlm batch` against the real stack: folders, manifests, failures as lines, resume after a kill,
reruns that retry what failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import encode, picture
from tests.integration.conftest import KEY

pytestmark = pytest.mark.integration


def vlm_batch(gateway, *args, wait=True):
    command = [sys.executable, "-m", "vlm_client.cli", "--address", gateway.address, "batch", *map(str, args)]
    env = {**os.environ, "VLM_API_KEY": KEY}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def lines_of(path) -> list[dict]:
    """Every line of a results file, each a complete JSON object with the fields a line must have."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        assert {"id", "input"} <= set(record)
        if "error" in record:
            assert set(record["error"]) == {"code", "message"} and record["error"]["message"]
        else:
            assert {"text", "model", "usage", "confidence", "finish_reason"} <= set(record)
    return records


def test_a_folder_job_writes_a_line_per_image_and_a_corrupt_image_is_an_error_line(gateway, tmp_path):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for i in range(4):
        (folder / ("nested" if i % 2 else "") / f"p{i}.png").write_bytes(encode(picture(60 + 10 * i, 40, seed=i)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image: skipped by extension")
    output = tmp_path / "out.jsonl"
    result = vlm_batch(gateway, folder, "--output", output, "--model", "pixtral", "--prompt", "What is it?",
                       "--max-tokens", "4", "--task", "caption", "--no-progress")
    assert result.returncode == 2, result.stderr  # one item failed, the others went on
    records = {record["id"]: record for record in lines_of(output)}
    assert set(records) == {"p0.png", "nested/p1.png", "p2.png", "nested/p3.png", "broken.png"}
    assert records["broken.png"]["error"]["code"] == "INVALID_ARGUMENT"
    # Four tokens cut every caption: the line keeps the text and says why it has no result.
    cut = records["p0.png"]
    assert cut["finish_reason"] == "length" and "result" not in cut and "max_tokens" in cut["result_error"]
    assert "done 4, failed 1, skipped 0" in result.stderr and "images/s" in result.stderr
    resumed = vlm_batch(gateway, folder, "--output", output, "--model", "pixtral", "--no-progress", "--no-retry-failed")
    assert "done 0, failed 0, skipped 5" in resumed.stderr and len(lines_of(output)) == 5
    again = vlm_batch(gateway, folder, "--output", output, "--model", "pixtral", "--no-progress")  # retries it
    assert "done 0, failed 1, skipped 4 (already in the output), retried 1" in again.stderr
    assert again.returncode == 2 and len(lines_of(output)) == 5


def test_a_killed_job_resumes_with_no_duplicates_and_nothing_lost(gateway, tmp_path):
    image = tmp_path / "p.png"
    image.write_bytes(encode(picture(64, 48, seed=1)))
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": f"item-{i}", "images": ["p.png"], "prompt": f"question {i}",
                                              "model": "qwen2.5-vl", "max_tokens": 48}) for i in range(30)) + "\n")
    output = tmp_path / "out.jsonl"
    job = vlm_batch(gateway, manifest, "--output", output, "--concurrency", "2", wait=False)
    deadline = time.monotonic() + 120
    while not (output.exists() and output.read_text().count("\n") >= 4):
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = len(lines_of(output))
    assert 4 <= finished < 30, "killed mid-run"
    with output.open("a") as torn:  # what a kill in the middle of a write leaves
        torn.write('{"id": "item-29", "input": {"ima')
    result = vlm_batch(gateway, manifest, "--output", output, "--concurrency", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    records = lines_of(output)
    ids = [record["id"] for record in records]
    assert sorted(ids) == sorted(f"item-{i}" for i in range(30)) and len(ids) == len(set(ids))
    assert f"skipped {finished}" in result.stderr


def test_a_repeated_id_is_named_before_anything_runs(gateway, tmp_path):
    manifest = tmp_path / "items.jsonl"
    manifest.write_text('{"id": 7, "model": "pixtral", "prompt": "hi"}\n{"id": "a", "model": "pixtral"}\n'
                        '{"id": "7", "model": "pixtral"}\n')
    result = vlm_batch(gateway, manifest, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 1 and "'7' on lines 1 and 3" in result.stderr, result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_bad_line_is_an_error_line_and_a_rerun_of_the_fixed_manifest_answers_it(gateway, tmp_path):
    manifest, output = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "ok", "model": "pixtral", "prompt": "hi", "max_tokens": 4},
             {"id": "typed", "model": "pixtral", "prompt": "hi", "max_tokens": "4"},  # refused here
             {"id": "too-long", "model": "pixtral", "prompt": "hi", "max_tokens": 10**6}]  # refused by the gateway
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first = vlm_batch(gateway, manifest, "--output", output, "--no-progress")
    assert first.returncode == 2 and "done 1, failed 2" in first.stderr, first.stderr
    records = {record["id"]: record for record in lines_of(output)}
    assert records["ok"]["usage"]["completion_tokens"] >= 1
    assert records["typed"]["error"]["code"] == "INVALID_ARGUMENT" and "max_tokens" in records["typed"]["error"]["message"]
    assert records["too-long"]["error"]["code"] == "INVALID_ARGUMENT"
    for line in lines:
        line["max_tokens"] = 4
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    fixed = vlm_batch(gateway, manifest, "--output", output, "--no-progress")
    assert fixed.returncode == 0 and "done 2, failed 0, skipped 1 (already in the output), retried 2" in fixed.stderr
    records = lines_of(output)
    assert sorted(r["id"] for r in records) == ["ok", "too-long", "typed"] and not any("error" in r for r in records)
