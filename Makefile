# Everything a newcomer needs: `make run` (serve the tiny models) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PROFILE ?= cpu
# explicit (default: models change only through LoadModel) or poll (Triton watches the repository).
MODEL_CONTROL ?= explicit
TRITON_WHEEL := nvidia-pytriton==0.7.0
XGRAMMAR_WHEEL := xgrammar==0.2.8
STAMP := $(VENV)/.installed

GEN := build/gen/python
PROTO := protos/vlm/v1/vlm.proto

.PHONY: setup system-tools protos node schemathesis reference-env perf-tools bench bench-gpu sweep models configs up down run ui test test-unit test-integration clean

setup: $(STAMP) protos node schemathesis reference-env

# Tools some tests drive: npm (the Node.js client), docker-compose (validates docker-compose.yml),
# chromium with chromedriver (the web UI's browser test) and kubectl (renders the Kustomize overlays).
# Installed from Debian's packages where missing and apt-get can run (as root, as in CI); otherwise
# named, and their tests skip on a developer machine (under CI=true they fail instead).
system-tools:
	@missing=""; command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || missing="$$missing chromium chromium-driver"; \
	command -v kubectl >/dev/null || missing="$$missing kubectl"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing from Debian's packages:$$missing"; mkdir -p build; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } \
	      >build/system-tools.log 2>&1 || { cat build/system-tools.log; exit 1; }; \
	  else echo "not installed:$$missing (their tests will be skipped; install them to run them)"; fi; fi

# The Node.js client's dependencies (skipped, with a note, where Node.js is not installed).
node: system-tools clients/node/node_modules/.package-lock.json

clients/node/node_modules/.package-lock.json: clients/node/package-lock.json
	@if command -v npm >/dev/null; then cd clients/node && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: skipping the Node.js client (its test will be skipped)"; fi

# Schemathesis in a virtualenv of its own (its pins apart from the service's): test_openapi_fuzz.py
# runs it against the real stack's /openapi.json.
SCHEMATHESIS := build/schemathesis/bin/schemathesis
schemathesis: $(SCHEMATHESIS)

$(SCHEMATHESIS): requirements-schemathesis.txt
	test -x build/schemathesis/bin/python || $(PYTHON) -m venv build/schemathesis
	build/schemathesis/bin/pip install --disable-pip-version-check -q -r requirements-schemathesis.txt
	touch $(SCHEMATHESIS)

# transformers' video processor (it needs torchvision) in a virtualenv of its own, for the reference
# tests only: PyPI's torchvision does not import beside the service's torch 2.13.0; see
# requirements-reference.txt (pip's output in build/reference-env.log). tests/unit/test_qwen_video.py
# runs tests/reference_env/ with it.
REFERENCE_ENV := build/reference-env
reference-env: $(REFERENCE_ENV)/.installed

$(REFERENCE_ENV)/.installed: requirements-reference.txt
	test -x $(REFERENCE_ENV)/bin/python || $(PYTHON) -m venv $(REFERENCE_ENV)
	$(REFERENCE_ENV)/bin/pip install --disable-pip-version-check -q -r requirements-reference.txt \
	  >build/reference-env.log 2>&1 || { cat build/reference-env.log; exit 1; }
	touch $@

# Python stubs of the public API (build outputs, never committed), importable as `vlm.v1`.
protos: $(GEN)/vlm/v1/vlm_pb2_grpc.py

$(GEN)/vlm/v1/vlm_pb2_grpc.py: $(PROTO) $(STAMP)
	mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTO)
	$(PY) -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'vlm-protos.pth').write_text(str(pathlib.Path('$(GEN)').resolve()) + '\n')"

# Re-run only when the pins change; `make setup` on an installed tree does nothing.
$(STAMP): requirements.txt pyproject.toml deploy/vlm-dont-write-bytecode.pth
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q -r requirements.txt
	$(PIP) install --disable-pip-version-check -q --no-deps $(TRITON_WHEEL) $(XGRAMMAR_WHEEL)
	$(PIP) install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	$(PY) -c "import shutil, sysconfig; shutil.copy('deploy/vlm-dont-write-bytecode.pth', sysconfig.get_paths()['purelib'])"
	touch $(STAMP)

# Tiny random-weight checkpoints of both architectures (build/models/<family>), and each one's
# vision encoder exported to ONNX (build/models/<family>/onnx/encoder.{fp32,int8,fp16}.onnx).
models: setup
	$(PY) -m vlm_serving.tiny_checkpoints build/models
	$(PY) -m vlm_serving.encoding.encoder_export build/models/qwen2_5_vl build/models/pixtral

# model_repository/*/config.pbtxt for PROFILE=cpu|gpu (more options: python -m vlm_serving.deploy.render -h).
configs: setup
	$(PY) -m vlm_serving.deploy.render --profile $(PROFILE)

run: models configs
	$(PY) -m vlm_serving.deploy.stack run --model-control $(MODEL_CONTROL)

up: models configs
	$(PY) -m vlm_serving.deploy.stack up --model-control $(MODEL_CONTROL)

# Stops `make up`'s stack, and the servers of a `make bench` that was killed before its own cleanup
# (each recorded in build/bench/pids/ while it runs), each with its process group.
down:
	$(PY) -m vlm_serving.deploy.stack down

# The web UI (Gradio, http://127.0.0.1:7860) over a running gateway (`make up`): its own process, the
# Python client inside. UI_ARGS="--address host:50051 --port 7860"; the API key from VLM_API_KEY
# (default: the local stack's dev-local-key).
UI_ARGS ?=
ui: setup
	VLM_API_KEY=$${VLM_API_KEY:-dev-local-key} $(PY) -m vlm_client.webui $(UI_ARGS)

test: models configs
	$(PY) -m pytest -q

test-unit: models
	$(PY) -m pytest -q tests/unit

test-integration: models configs
	$(PY) -m pytest -q tests/integration

# perf_analyzer (binary from the tritonclient 2.48 wheel) into build/perf/, apart from the venv.
perf-tools: setup
	bash perf/install_perf_tools.sh

# Starts its own servers, prints each row as it is measured and one table of ratios at the end, stops them.
# `make bench BENCH_ARGS=--quick` for a smoke run (fewer requests and rows, noisier; within 4 minutes
# on 2 cores); `BENCH_ARGS="--only 18 3"` for some row groups.
BENCH_ARGS ?=
bench: models configs
	$(PY) -m perf.bench $(BENCH_ARGS)

# The generation engines alone (no Triton) at the real Qwen2.5-VL-7B and Pixtral-12B configurations,
# random bf16 weights: the engine now, the engine before the paged cache and plain `generate` at 1, 8,
# 32 and 64 rows (perf/engines_at_rows.py), then static against in flight (perf/engine.py). Needs
# only torch and transformers: on a GPU machine without this Makefile's venv, run both from the root
# (the old engine's tree comes from git: `python -m perf.engine_before` writes it under build/ first
# where the history is, to be carried along).
GPU_PYTHON ?= python3
bench-gpu:
	$(GPU_PYTHON) -m perf.engines_at_rows --config real --device cuda
	$(GPU_PYTHON) -m perf.engine --config real --device cuda $(BENCH_ARGS)

# perf_analyzer concurrency sweeps (CSV under build/perf/sweeps/) against the running stack (`make up`).
sweep: perf-tools
	$(PY) -m perf.sweep

clean:
	rm -rf build model_repository/*/config.pbtxt
