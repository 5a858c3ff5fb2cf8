# Two commands for a newcomer (see README):  make run   and   make test
# Both create .venv on first use. torch is installed only if the venv lacks it; the pinned
# default (2.13.0) is the CPU build on CPU-only machines, so no CUDA wheels are pulled there.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup run demo test bench gpu-check gpu-check-dry-run clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Editing the C++ sources (or the build) reruns the install, which rebuilds flare_kernels._C.
NATIVE_SOURCES := CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/kernels/*.h)

$(VENV)/.installed: setup.py pyproject.toml $(NATIVE_SOURCES) | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	# --no-build-isolation: build against the torch installed above, never a fresh unpinned one.
	$(BIN)/python -m pip install --no-build-isolation -e ".[all]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/flare train

demo: setup
	$(BIN)/python -m benchmarks.demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.run

# The one-call GPU check (benchmarks/README.md, "One-call GPU check"): on a CUDA machine, < 8 min.
# Here, without a GPU: the dry run (every phase planned, the folder written under results/tmp/).
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check run

gpu-check-dry-run: setup
	$(BIN)/python -m benchmarks.gpu_check run --dry-run

clean:
	rm -rf $(VENV) build *.egg-info flare_kernels/_C*.so
