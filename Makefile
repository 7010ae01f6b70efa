# The project's commands. `make help` lists them. The first use of any of them creates .venv and installs
# the pinned dependencies (requirements.lock); later uses reinstall only when pyproject.toml or the lock change.

PYTHON ?= python3
VENV   := .venv
# DVC runs each stage's `python -m ...` through PATH, and so do its queue workers: put the venv first, as an
# absolute path. That path may hold spaces (a clone in "My Projects"), on which make splits words, and even the
# commands it runs without a shell ("make: /home/me/My: No such file"): so recipes name the venv by its relative
# path, and prerequisites stay relative.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# DVC's plot page with its JavaScript inlined (`dvc plots show` offline), built from a pinned Python package.
PLOTS_PAGE := web/dvc-plots.html
# What the pipeline needs (make repro), and the development tools on top (make test): a first result does not
# wait for jupyterlab, mypy and the rest.
SETUP      := $(VENV)/.installed $(PLOTS_PAGE)
DEV        := $(SETUP) $(VENV)/.installed-dev

.DEFAULT_GOAL := help
.PHONY: help install browser postgres qemu strace team-server repro verify notebook test test-fast sweep screenshots bench lint ui serve lock clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python >= 3.11 needed, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c requirements.lock -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $@

# The venv's python (first on PATH): the JavaScript comes from its vl-convert-python (requirements.lock).
$(PLOTS_PAGE): web/build_template.py $(VENV)/.installed
	python web/build_template.py

install: $(SETUP) ## Create .venv, install the pipeline's pinned dependencies and build the offline plot page

# The browser tests need Chromium (or Chrome, as on GitHub's runners); as root (CI), this installs Debian's.
browser: ## Install Debian's chromium for the browser tests, if no Chromium or Chrome is there
	@command -v chromium >/dev/null || command -v google-chrome >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else \
	    echo "error: the browser tests need Debian's chromium: sudo apt-get install chromium" >&2; exit 2; \
	  fi; }

# The team server's tests need PostgreSQL; as root (CI), this installs Debian's.
postgres: ## Install Debian's postgresql for the team-server tests, if it is missing
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	  else \
	    echo "error: the team-server tests need PostgreSQL: sudo apt-get install postgresql" >&2; exit 2; \
	  fi; }

# The emulated-CPU tests run under qemu-user; as root (CI), this installs Debian's.
qemu: ## Install Debian's qemu-user for the emulated-CPU tests, if qemu-x86_64 is missing
	@command -v qemu-x86_64 >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user; \
	  else \
	    echo "error: the emulated-CPU tests need qemu-user: sudo apt-get install qemu-user" >&2; exit 2; \
	  fi; }

# The telemetry test traces what the pipeline and the UI connect to with strace; as root (CI), this installs Debian's.
strace: ## Install Debian's strace for the test that nothing connects out, if it is missing
	@command -v strace >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace; \
	  else \
	    echo "error: the telemetry test needs strace: sudo apt-get install strace" >&2; exit 2; \
	  fi; }

TEAM_DIR ?= .team
team-server: $(SETUP) postgres ## Start PostgreSQL and an MLflow server on it at http://127.0.0.1:5001 (data in TEAM_DIR)
	python -m team_server --dir "$(TEAM_DIR)"

repro: $(SETUP) ## Run the pipeline (dvc repro) and print a summary of the result
	dvc repro
	python -m pipeline.summary

# RUN: a run ID, run name or DVC experiment name, in MLFLOW_TRACKING_URI's store or the project's. CPU: rebuild
# under qemu-x86_64 -cpu CPU (make qemu). Exit status 0 only when every output is the same (pipeline/verify.py).
RUN ?=
CPU ?=
verify: $(SETUP) ## Rebuild run RUN=... from its own commit and params, and compare every output's md5 (CPU=Haswell: emulated)
	@test -n "$(RUN)" || { echo "error: verify: name the run: make verify RUN=<run ID, run name or DVC experiment name>" >&2; exit 2; }
	python -m pipeline.verify "$(RUN)" $(if $(CPU),--cpu "$(CPU)")

# The stored outputs are what this prints (tests/test_notebook.py): no timings, which would change every run.
notebook: repro $(DEV) ## Run notebooks/walkthrough.ipynb again in place, on the pipeline's latest result
	jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False \
		notebooks/walkthrough.ipynb

test: $(DEV) browser postgres qemu strace ## Lint, type-check and run the whole test suite, end-to-end and browser tests included
	ruff check pipeline team_server tests web benchmarks
	ruff format --check pipeline team_server tests web benchmarks
	mypy
	python -m pytest

test-fast: $(DEV) ## Only the unit tests (tests/conftest.py: the stage and system tiers run processes, DVC, servers)
	python -m pytest -m unit

# A grid of queued DVC experiments, run JOBS at a time into the one MLflow store, every run tagged
# sweep=SWEEP (filter on it in the MLflow UI and compare). GRID: one or more space-separated name=v1,v2,...
SWEEP ?= $(shell date +sweep-%Y%m%d-%H%M%S)
GRID  ?= train.lr=0.01,0.05,0.1
JOBS  ?= 2
sweep: $(SETUP) ## Queue GRID (train.lr=0.01,0.05,0.1) as experiments, run them JOBS at a time, tag them sweep=SWEEP
	@# DVC 3.67's queue writes the cache path into an ASCII-only config: every experiment fails in such a folder.
	@! printf '%s' "$(CURDIR)" | LC_ALL=C grep -q '[^ -~]' || { echo "error: DVC's experiment queue fails in a \
	folder whose path is not ASCII ($(CURDIR)): clone into one that is, or run dvc exp run -S ... one at a time" >&2; exit 2; }
	dvc exp run --queue $(foreach g,$(GRID),-S '$(g)') -S 'tracking.sweep=$(SWEEP)'
	dvc queue start -j $(JOBS)
	@while dvc queue status | grep -qE '\b(Queued|Running)\b'; do sleep 2; done
	dvc queue stop
	@! dvc queue status | grep -E '\bFailed\b' || { echo "error: some experiments failed: dvc queue logs <name>" >&2; exit 1; }
	dvc exp show --no-pager
	@echo "MLflow: make ui, then filter the runs with tags.sweep = '$(SWEEP)'"

screenshots: $(DEV) browser ## Regenerate the pictures of README.md and docs/ (docs/images/) with the browser tests
	TEST_ARTIFACTS=docs/images python -m pytest -q tests/test_browser.py \
		tests/test_team.py::test_a_queued_sweep_lands_in_one_store_tagged_as_one_sweep

# The benchmark runs the pipeline in copies of the repository, plot page included (tests/conftest.py copy_repo).
bench: $(DEV) ## Measure the performance targets (P1-P5) and print them as ratios to their floors
	python benchmarks/bench.py

lint: $(VENV)/.installed-dev ## Fix what ruff can fix and reformat the code
	ruff check --fix pipeline team_server tests web benchmarks
	ruff format pipeline team_server tests web benchmarks

# Loopback only, with MLflow's host-header and CORS checks left on: never --host 0.0.0.0, --allowed-hosts '*'
# or --disable-security-middleware here (tests/test_paths.py checks a foreign Host gets 403).
UI_PORT ?= 5000
ui: $(VENV)/.installed ## Open the MLflow UI on http://127.0.0.1:5000 (UI_PORT=...) against the pipeline's store
	@echo "the runs, in the UI's model-training mode: http://127.0.0.1:$(UI_PORT)/#/experiments?workflowType=machine_learning"
	@# One process is plenty for one person, and it keeps TCP_NODELAY (Kludex/uvicorn#3149: more workers lose it).
	@# MLflow's usage telemetry off unless the environment says otherwise, as the package does for the stages:
	@# `mlflow ui` does not import the package (tests/test_paths.py traces it).
	MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} \
		mlflow ui --backend-store-uri "$$(python -m pipeline.tracking)" --host 127.0.0.1 --port $(UI_PORT) --workers 1

SERVE_PORT ?= 5001
serve: $(VENV)/.installed ## Serve models:/<registered model>@champion on http://127.0.0.1:5001/invocations (SERVE_PORT=...)
	python -m pipeline.serve --port $(SERVE_PORT)

lock: ## Re-resolve the dependencies from pyproject.toml and rewrite requirements.lock
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	@# The local "+cpu" label names this machine's wheel; plain ==X.Y.Z matches it and any platform's build.
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e' \
		| sed -E 's/^(torch==[^+]+)\+cpu$$/\1/' > requirements.lock
	rm -rf .lock-venv

clean: ## Remove the virtual environment and caches (keeps data/, the DVC cache and the MLflow store)
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info $(PLOTS_PAGE)
