"""The generation engine as it was before issue 25 (dense left-padded `DynamicCache`, admission by
prompt + max_tokens reserved at the longest row's width, padded lock-step prefill), for benchmarks
that compare it with today's engine on the same requests.

`git archive` writes that commit's `vlm_serving` package under build/engine_before_paged/ (once);
a benchmark runs its measuring function in a child process whose PYTHONPATH puts that tree first,
so `import vlm_serving` there is the old package while `perf` stays this checkout's. Both engines
take the same `GenerationRequest`, `EngineLimits` (the old one has no block or prefix fields) and
`RequestSink`, so one measuring function drives either.

On a machine without the git history (the GPU machine gets a copy of the working tree), extract
the tree here first (`python -m perf.engine_before`) and carry build/engine_before_paged along.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The last commit of main before the paged engine was merged (efdfc91^1).
COMMIT = "ed122c9864950bd0e8bbb69db7e3aa0c9a417f13"
TREE = ROOT / "build" / "engine_before_paged"


def extract() -> Path:
    """The old `vlm_serving` package under TREE (written once from git)."""
    if not (TREE / "vlm_serving" / "generation" / "engine.py").exists():
        TREE.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", COMMIT, "vlm_serving"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(TREE)], input=archive, check=True)
    return TREE


def run_measure(module: str, engine: str, arguments: dict, timeout: float = 1800) -> dict:
    """`module.measure(**arguments)` in a child process on `engine` ("now": this checkout's package,
    "before": the tree above; `-P` keeps the working directory off the path), its JSON result back.
    Each side gets a fresh process: neither inherits the other's allocations or compiled kernels."""
    path = [str(extract()), str(ROOT)] if engine == "before" else [str(ROOT)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")])}
    code = (f"import json, sys; from {module} import measure; "
            f"print(json.dumps(measure(**json.loads(sys.argv[1]))))")
    finished = subprocess.run([sys.executable, "-P", "-c", code, json.dumps(arguments)], env=environment,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if finished.returncode != 0:
        raise RuntimeError(f"{module} on the {engine} engine failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def measure() -> dict:
    """Which engine this process runs (for the test of `run_measure`)."""
    import vlm_serving.generation.engine as engine

    return {"engine": engine.__file__}


if __name__ == "__main__":
    print(extract())
