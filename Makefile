# The project's commands. `make help` lists them. The first use of any of them creates .venv and installs
# the pinned dependencies (requirements.lock); later uses reinstall only when pyproject.toml or the lock change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
# DVC runs each stage's `python -m ...` through PATH, and so do its queue workers: put the venv first.
export PATH := $(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install repro test test-fast bench lint ui lock clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python >= 3.11 needed, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $@

install: $(VENV)/.installed ## Create .venv and install the pinned dependencies

repro: $(VENV)/.installed ## Run the pipeline (dvc repro) and print a summary of the result
	dvc repro
	python -m pipeline.summary

test: $(VENV)/.installed ## Lint, type-check and run the whole test suite, end-to-end tests included
	ruff check pipeline tests
	ruff format --check pipeline tests
	mypy
	python -m pytest

test-fast: $(VENV)/.installed ## Only the unit tests (skips those marked slow, which run DVC, servers or subprocesses)
	python -m pytest -m "not slow"

bench: $(VENV)/.installed ## Measure the performance targets (P1-P3) and print them as ratios to their floors
	python benchmarks/bench.py

lint: $(VENV)/.installed ## Fix what ruff can fix and reformat the code
	ruff check --fix pipeline tests
	ruff format pipeline tests

# Loopback only, with MLflow's host-header and CORS checks left on: never --host 0.0.0.0, --allowed-hosts '*'
# or --disable-security-middleware here (tests/test_reliability.py checks a foreign Host gets 403).
UI_PORT ?= 5000
ui: $(VENV)/.installed ## Open the MLflow UI on http://127.0.0.1:5000 (UI_PORT=...) against the pipeline's store
	mlflow ui --backend-store-uri "$$(python -m pipeline.tracking)" --host 127.0.0.1 --port $(UI_PORT)

lock: ## Re-resolve the dependencies from pyproject.toml and rewrite requirements.lock
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	@# The local "+cpu" label names this machine's wheel; plain ==X.Y.Z matches it and any platform's build.
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e' \
		| sed -E 's/^(torch==[^+]+)\+cpu$$/\1/' > requirements.lock
	rm -rf .lock-venv

clean: ## Remove the virtual environment and caches (keeps data/, the DVC cache and the MLflow store)
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
