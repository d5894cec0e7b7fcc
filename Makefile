# Every target creates/uses the virtual environment $(VENV) and installs what it needs, so on a
# fresh machine `make quickstart` and `make test` are the whole set-up.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of PyTorch (this pin is the one the project's machines carry on disk). Override for a
# CUDA machine, e.g. `make TORCH_SPEC='torch>=2.2' test`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.tokencompress-installed

.PHONY: install quickstart test test-fast lint type format clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,dev]"
	touch $(STAMP)

install: $(STAMP)  ## create the virtual environment and install the package with test/dev extras

quickstart: $(STAMP)  ## the main job on the embedded default: reconstructor, agent, evaluation
	$(PY) -m experiments.quickstart

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

type: $(STAMP)  ## mypy
	$(PY) -m mypy tokencompress_env agents callbacks experiments

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
