# One command each, from a fresh machine: `make demo` (set up + main job), `make test` (set up + tests).
# pyproject.toml states ranges; constraints.txt pins every package at the versions tested here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_ROOT ?= ../shared/data
OUTPUT ?= outputs
PYTEST_ARGS ?=

export MALLOC_MMAP_THRESHOLD_ ?= 131072

.PHONY: venv test lint demo demo-real benchmark clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,simulation]"
	touch $(STAMP)

test: venv lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# anomalib's ruff rule set (pyproject.toml); part of `make test`, so CI runs it.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Federated FedDyMem on the embedded synthetic dataset (generated, no download, no network).
demo: venv
	$(VENV)/bin/feddymem demo --output $(OUTPUT)/demo

# The same on the real benchmark folders (skips with a message when DATA_ROOT is absent).
demo-real: venv
	$(VENV)/bin/feddymem demo --data-root $(DATA_ROOT) --output $(OUTPUT)/demo_real

# FedDyMem vs Patchcore on the real folders (long: about an hour or more on 2 CPU cores).
benchmark: venv
	$(VENV)/bin/feddymem benchmark --config benchmark/shared_data.yaml --data-root $(DATA_ROOT) --output $(OUTPUT)/benchmark

clean:
	rm -rf $(VENV) $(OUTPUT) .pytest_cache
