"""Fill a Triton server's volumes: the model repository, each family's checkpoint and its ONNX encoder.

    python -m vlm_serving.deploy.fill_volumes --weights-source s3://bucket/vlm --weights /vlm/weights \\
        --families qwen2_5_vl --repository-source /opt/vlm/model_repository --repository /vlm/model_repository

Run by the Triton pods' init container (deploy/kubernetes/overlays/gpu: a fresh ReadWriteOnce volume per
pod) or once by a Job (components/read-only-many: volumes many pods read). Three steps:

1. the model repository (each model's version folders and their `model.py`) is copied from
   `--repository-source` (the Triton image holds the one it was built with);
2. each family's checkpoint folder is placed from `--weights-source`, any fsspec URL (`s3://`, `gs://`,
   `az://` with that store's fsspec package; a local folder, such as a pre-populated volume): it holds
   one folder per family (`qwen2_5_vl/`, `pixtral/`), each a transformers checkpoint, optionally with
   its exported `onnx/`. Files already there with the source's size are kept (a Job run again copies
   only what changed size or is missing); each file is written beside its place and renamed into it
   once complete, so an interrupted fill never leaves a truncated file behind. `onnx/` is placed last:
   its files are newer than the weights, which is how the exporter knows they are current;
3. the encoder variant the render profile serves is exported where the checkpoint lacks it
   (`vlm_serving.encoding.encoder_export`; on CPU, with the whole checkpoint in fp32 in memory: export
   once before uploading to skip it in every pod).

Each family's folder gets a marker file (FILLED_MARKER) once all three are done: pods that share a
volume filled by a Job wait for it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vlm_serving.pipelines import FAMILIES

ONNX_FOLDER = "onnx"
PARTIAL_SUFFIX = ".partial"
# Written into each family's folder once it is complete: what pods sharing the volume wait for.
FILLED_MARKER = ".vlm-filled"


class FillError(RuntimeError):
    pass


@dataclass
class Placed:
    """What one family's placement did."""

    copied_files: int = 0
    copied_bytes: int = 0
    kept_files: int = 0
    exported: bool = False


def copy_repository(source: Path, target: Path) -> int:
    """Every model folder of `source` into `target`, version folders and all, without bytecode;
    configs are rendered in the Triton container for its own node. The number of models."""
    models = sorted(path for path in source.iterdir() if path.is_dir() and any(path.iterdir()))
    if not models:
        raise FillError(f"--repository-source {source}: no model folders in it (the Triton image holds its "
                        "repository at /opt/vlm/model_repository)")
    for model in models:
        shutil.copytree(model, target / model.name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt"))
    return len(models)


def place_checkpoint(source_url: str, family: str, target: Path) -> Placed:
    """`<source_url>/<family>/` into `target/<family>/`, its `onnx/` last; files present with the source's size are kept."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source_url.rstrip("/"))
    folder = f"{root.rstrip('/')}/{family}"
    if not fs.exists(f"{folder}/config.json"):
        raise FillError(f"--weights-source {source_url}: no {family}/config.json there; the source holds one "
                        f"transformers checkpoint folder per family ({', '.join(FAMILIES)}), e.g. "
                        f"{source_url.rstrip('/')}/{family}/config.json")
    files = fs.find(folder, detail=True)
    relative = {str(PurePosixPath(path).relative_to(folder)): info for path, info in files.items()
                if info.get("type", "file") == "file"}
    # The weights before onnx/: the exporter counts an encoder as current when it is newer than the weights.
    order = sorted(relative, key=lambda name: (name.split("/")[0] == ONNX_FOLDER, name))
    placed = Placed()
    destination = target / family
    for name in order:
        size, local = relative[name]["size"], destination / name
        if local.is_file() and local.stat().st_size == size:
            placed.kept_files += 1
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + PARTIAL_SUFFIX)
        fs.get_file(f"{folder}/{name}", str(partial))
        if partial.stat().st_size != size:
            raise FillError(f"{source_url.rstrip('/')}/{family}/{name}: {partial.stat().st_size} bytes arrived of "
                            f"{size}; run the fill again")
        partial.replace(local)
        placed.copied_files += 1
        placed.copied_bytes += size
    return placed


def export_encoder(checkpoint: Path, variant: str) -> bool:
    """Export the encoder `variant` unless the checkpoint holds one newer than its weights; whether it exported."""
    from vlm_serving.encoding.encoder_export import export, weights_mtime

    onnx = checkpoint / ONNX_FOLDER
    wanted = onnx / f"encoder.{variant}.onnx"
    if wanted.is_file() and (onnx / "encoder.json").is_file() and wanted.stat().st_mtime >= weights_mtime(checkpoint):
        return False
    export(checkpoint, (variant,))
    return True


def main(argv: list[str] | None = None) -> int:
    from vlm_serving.deploy.render import PROFILES
    from vlm_serving.encoding.encoder import VARIANTS

    parser = argparse.ArgumentParser(description="Fill a Triton server's model repository and checkpoint volumes.")
    parser.add_argument("--weights-source", required=True,
                        help="fsspec URL or folder holding one checkpoint folder per family (s3://bucket/vlm, /source)")
    parser.add_argument("--weights", type=Path, required=True, help="folder to place the checkpoints in")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated (default: {','.join(FAMILIES)})")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu",
                        help="render profile whose encoder variant to export (default: %(default)s)")
    parser.add_argument("--encoder-variant", choices=VARIANTS, help="export this variant instead of the profile's")
    parser.add_argument("--repository-source", type=Path, help="model repository to copy (the image's /opt/vlm/model_repository)")
    parser.add_argument("--repository", type=Path, help="where to copy it")
    args = parser.parse_args(argv)
    if not args.weights_source.strip():
        parser.error("--weights-source is empty: give the URL or folder holding the checkpoints "
                     "(on Kubernetes: the key weights-source of the ConfigMap vlm-triton)")
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    if unknown := [name for name in families if name not in FAMILIES]:
        parser.error(f"--families: unknown {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    if (args.repository_source is None) != (args.repository is None):
        parser.error("--repository-source and --repository go together")
    variant = args.encoder_variant or PROFILES[args.profile].encoder_variant
    try:
        if args.repository:
            count = copy_repository(args.repository_source, args.repository)
            print(f"repository: {count} models from {args.repository_source} into {args.repository}", flush=True)
        for family in families:
            started = time.monotonic()
            placed = place_checkpoint(args.weights_source, family, args.weights)
            print(f"{family}: {placed.copied_files} files ({placed.copied_bytes / 1e9:.2f} GB) copied, "
                  f"{placed.kept_files} kept, in {time.monotonic() - started:.1f}s", flush=True)
            started = time.monotonic()
            exported = export_encoder(args.weights / family, variant)
            print(f"{family}: encoder {variant} {'exported' if exported else 'current'} "
                  f"in {time.monotonic() - started:.1f}s", flush=True)
            (args.weights / family / FILLED_MARKER).write_text(
                json.dumps({"source": args.weights_source, "encoder_variant": variant}) + "\n")
    except (FillError, FileNotFoundError, PermissionError) as error:
        print(f"fill_volumes: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
