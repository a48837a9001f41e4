#!/usr/bin/env bash
# Install perf_analyzer into build/perf/ without touching the project's virtualenv:
# - the binary from the tritonclient==2.48.0 wheel (PyPI's perf-analyzer 2.60 needs glibc 2.38),
# - Debian's libb64-0d, which the binary links against,
# - libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel (loaded even on CPU-only machines).
# The gateway keeps its own tritonclient (2.73.0); nothing here is pip-installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/perf
mkdir -p "$OUT/bin" "$OUT/lib" "$OUT/wheels"

if ! ldconfig -p | grep -q libb64.so.0d; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null
  else
    echo "perf_analyzer needs Debian's libb64-0d: run 'sudo apt-get install -y libb64-0d'" >&2
    exit 1
  fi
fi

PIP=".venv/bin/pip"
if [ ! -x "$OUT/bin/perf_analyzer.real" ]; then
  "$PIP" download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --platform manylinux1_x86_64 --python-version 3.11 -d "$OUT/wheels" tritonclient==2.48.0
  .venv/bin/python - "$OUT" <<'PY'
import glob, sys, zipfile
out = sys.argv[1]
wheel = glob.glob(f"{out}/wheels/tritonclient-2.48.0-*.whl")[0]
with zipfile.ZipFile(wheel) as archive:
    data = archive.read("tritonclient-2.48.0.data/data/bin/perf_analyzer")
open(f"{out}/bin/perf_analyzer.real", "wb").write(data)
PY
  chmod +x "$OUT/bin/perf_analyzer.real"
fi
if [ ! -e "$OUT/lib/libcudart.so.12" ]; then
  "$PIP" download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 -d "$OUT/wheels" "nvidia-cuda-runtime-cu12==12.9.79"
  .venv/bin/python - "$OUT" <<'PY'
import glob, sys, zipfile
out = sys.argv[1]
wheel = glob.glob(f"{out}/wheels/nvidia_cuda_runtime_cu12-*.whl")[0]
with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist() if n.endswith("lib/libcudart.so.12"))
    open(f"{out}/lib/libcudart.so.12", "wb").write(archive.read(name))
PY
fi
cat > "$OUT/bin/perf_analyzer" <<SH
#!/usr/bin/env bash
LD_LIBRARY_PATH="$(pwd)/$OUT/lib:\${LD_LIBRARY_PATH:-}" exec "$(pwd)/$OUT/bin/perf_analyzer.real" "\$@"
SH
chmod +x "$OUT/bin/perf_analyzer"
"$OUT/bin/perf_analyzer" --version >/dev/null 2>&1 || { echo "perf_analyzer does not start; see $OUT" >&2; exit 1; }
echo "perf_analyzer: $OUT/bin/perf_analyzer"
