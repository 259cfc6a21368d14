# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to what the local wheel cache holds (CUDA builds; they run on CPU too).
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_LOGGING_EXTRA_LOGGERS := srcflow

.PHONY: .venv demo test test-fast bench clean

.venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[dev]" $(TORCH_PINS)
	touch $@

demo: .venv
	$(BIN)/srcflow run --config configs/smoke.yaml
	$(BIN)/srcflow status --config configs/smoke.yaml

test: .venv
	$(BIN)/python -m pytest -q

test-fast: .venv
	$(BIN)/python -m pytest -q -m "not e2e"

bench: .venv
	$(BIN)/python benchmarks/encode.py

clean:
	rm -rf data/artifacts/smoke .prefect
