"""vlm_serving.deploy.fill_volumes end to end, as the Triton pods' init container and the fill Job run it: a
local folder stands in for the object store (the same fsspec path the s3:// URLs take), the tiny
checkpoints are the checkpoints, and the encoder the fill exports is loaded by ONNX Runtime as Triton does."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vlm_serving.deploy.fill_volumes import FILLED_MARKER, PARTIAL_SUFFIX


def fill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_serving.deploy.fill_volumes", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def store(tmp_path, checkpoints) -> Path:
    """The object store: one checkpoint folder per family, Qwen2.5-VL's without its onnx/ (the fill
    exports it), Pixtral's with the onnx/ exported before upload (the fill copies it)."""
    store = tmp_path / "store"
    for family in ("qwen2_5_vl", "pixtral"):
        shutil.copytree(checkpoints / family, store / family)
    shutil.rmtree(store / "qwen2_5_vl" / "onnx")
    return store


def test_a_pod_fills_its_volumes_from_the_store_and_exports_the_encoder_it_lacks(tmp_path, store):
    from vlm_serving.deploy.render import PROFILES
    from vlm_serving.encoding.encoder import OnnxEncoder

    weights, repository = tmp_path / "weights", tmp_path / "repository"
    result = fill("--weights-source", f"file://{store}", "--weights", str(weights), "--families", "qwen2_5_vl",
                  "--repository-source", str(REPO_ROOT / "model_repository"), "--repository", str(repository))
    assert result.returncode == 0, result.stderr[-3000:]
    # The repository: every model's code, no rendered config (the Triton container renders its own).
    tracked = sorted(path.parent.parent.name for path in (REPO_ROOT / "model_repository").glob("*/1/model.py"))
    assert sorted(path.parent.parent.name for path in repository.glob("*/1/model.py")) == tracked
    assert not list(repository.rglob("config.pbtxt")) and not list(repository.rglob("__pycache__"))
    # The family asked for, its files as the store has them, nothing half-written.
    checkpoint = weights / "qwen2_5_vl"
    assert sorted(path.name for path in weights.iterdir()) == ["qwen2_5_vl"]
    placed = digests(checkpoint)
    assert {name: digest for name, digest in placed.items() if not name.startswith("onnx/") and name != FILLED_MARKER} \
        == digests(store / "qwen2_5_vl")
    assert not [name for name in placed if name.endswith(PARTIAL_SUFFIX)]
    # The gpu profile's encoder variant, exported because the store had none: it runs.
    variant = PROFILES["gpu"].encoder_variant
    assert f"qwen2_5_vl: encoder {variant} exported" in result.stdout
    encoder = OnnxEncoder("qwen2_5_vl", checkpoint / "onnx", variant=variant)
    assert encoder.path == checkpoint / "onnx" / f"encoder.{variant}.onnx"
    assert json.loads((checkpoint / FILLED_MARKER).read_text()) == {"source": f"file://{store}",
                                                                  "encoder_variant": variant}


def test_an_encoder_in_the_store_is_copied_not_exported_and_a_second_fill_keeps_what_is_there(tmp_path, store):
    weights = tmp_path / "weights"
    result = fill("--weights-source", str(store), "--weights", str(weights), "--families", "pixtral")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pixtral: encoder fp16 current" in result.stdout
    assert {name: digest for name, digest in digests(weights / "pixtral").items() if name != FILLED_MARKER} \
        == digests(store / "pixtral")
    # Copied in order, the encoder after the weights: the exporter takes it as current.
    onnx = weights / "pixtral" / "onnx" / "encoder.fp16.onnx"
    assert onnx.stat().st_mtime >= (weights / "pixtral" / "model.safetensors").stat().st_mtime
    # A second run (the Job run again): files of the store's size are kept, a truncated one (a run
    # killed mid-copy that renamed nothing still leaves none; a file damaged otherwise) is replaced.
    damaged = weights / "pixtral" / "tokenizer.json"
    damaged.write_bytes(damaged.read_bytes()[:100])
    (weights / "pixtral" / f"model.safetensors{PARTIAL_SUFFIX}").write_bytes(b"left by a killed run")
    result = fill("--weights-source", str(store), "--weights", str(weights), "--families", "pixtral")
    assert result.returncode == 0, result.stderr[-3000:]
    files = len(digests(store / "pixtral"))
    assert f"pixtral: 1 files (0.00 GB) copied, {files - 1} kept" in result.stdout
    assert digests(weights / "pixtral")["tokenizer.json"] == digests(store / "pixtral")["tokenizer.json"]


def test_a_missing_family_or_an_empty_source_is_refused_naming_the_fix(tmp_path, store):
    shutil.rmtree(store / "pixtral")
    result = fill("--weights-source", f"file://{store}", "--weights", str(tmp_path / "weights"))
    assert result.returncode == 1
    assert "no pixtral/config.json there" in result.stderr and f"file://{store}/pixtral/config.json" in result.stderr
    result = fill("--weights-source", "", "--weights", str(tmp_path / "weights"))
    assert result.returncode == 2 and "weights-source of the ConfigMap vlm-triton" in result.stderr
    result = fill("--weights-source", str(store), "--weights", str(tmp_path / "weights"), "--families", "llava")
    assert result.returncode == 2 and "unknown llava" in result.stderr
