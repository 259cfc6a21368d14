# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# uv.lock is the one lock (docker/Dockerfile installs it too): uv resolves it (`make lock`), pip installs what it
# pins with their hashes, so torch/torchvision (CUDA builds; they run on CPU too) come from this machine's local
# wheel cache, which pip sees and uv does not. The same uv as docker/Dockerfile.
UV_VERSION := 0.13.8

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_LOGGING_EXTRA_LOGGERS := srcflow

.PHONY: .venv demo test test-fast lint bench clean

.venv: $(VENV)/.installed

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)

# --locked: a pyproject.toml that changed since uv.lock fails here, naming `uv lock` (run `make lock`)
$(VENV)/.installed: pyproject.toml uv.lock | $(BIN)/uv
	$(BIN)/uv export -q --locked --extra dev --no-emit-project -o $(VENV)/requirements.txt
	$(BIN)/pip install -q --require-hashes -r $(VENV)/requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

.PHONY: lock
lock: | $(BIN)/uv
	$(BIN)/uv lock

demo: .venv
	$(BIN)/srcflow run --config configs/smoke.yaml
	$(BIN)/srcflow status --config configs/smoke.yaml

# -n auto: one pytest worker per core (pytest-xdist); the e2e tests mostly wait on servers and subprocesses
test: .venv
	$(BIN)/python -m pytest -q -n auto

test-fast: .venv
	$(BIN)/python -m pytest -q -n auto -m "not e2e"

lint: .venv
	$(BIN)/ruff check .

bench: .venv
	$(BIN)/python benchmarks/encode.py

clean:
	rm -rf data/artifacts/smoke .prefect
