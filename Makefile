# The two commands of the README:
#   make demo   synthesize data/synthetic, train runs/demo, predict runs/demo/submission.csv
#   make test   the test suite (pytest); `make test-fast` skips the slow multi-process tests
# Both create or update .venv themselves on a bare machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the releases this project is tested with; override for another
# CUDA build, e.g. make demo TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/synthetic
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint format clean-demo gpu-prepare gpu-check gpu-check-dry

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(DEMO_DATA)/train_labels.csv: | $(STAMP)
	$(PY) -m invasive_dist synth --out $(DEMO_DATA) --n-train 300 --n-test 100 --size 384x288 --seed 0 --workers 2

demo: $(STAMP) $(DEMO_DATA)/train_labels.csv
	$(PY) -m invasive_dist check-data --data $(DEMO_DATA)
	$(PY) -m invasive_dist train --config configs/demo.yaml data.root=$(DEMO_DATA) resume=auto
	$(PY) -m invasive_dist predict --run-dir runs/demo --data $(DEMO_DATA)
	$(PY) -m invasive_dist report --run-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check invasive_dist tests
	$(VENV)/bin/ruff format --check invasive_dist tests

format: $(STAMP)
	$(VENV)/bin/ruff format invasive_dist tests
	$(VENV)/bin/ruff check --fix invasive_dist tests

# On a GPU machine (python3 with torch; see docs/performance.md). gpu-prepare: the DALI and compiler
# checks and the bench data only, before the check (no GPU work); gpu-check-dry: its logic on a CPU.
gpu-prepare:
	bash tests/gpu_check.sh prepare

gpu-check:
	bash tests/gpu_check.sh

gpu-check-dry: $(STAMP)
	GPU_CHECK_DRY=1 PYTHON=$(PY) PATH="$(VENV)/bin:$$PATH" bash tests/gpu_check.sh

clean-demo:
	rm -rf runs/demo $(DEMO_DATA)
