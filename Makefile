# Every target creates or refreshes the virtual environment first, so each one works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

env: $(STAMP)

demo: env  ## the main job on the embedded default
	$(VENV)/bin/blip3 demo

test: env  ## the fast suite (CI runs this)
	$(PY) -m pytest -q

test-slow: env  ## tests marked slow
	$(PY) -m pytest -q -m slow

lint: env  ## style and import order (ruff)
	$(VENV)/bin/ruff check blip3 tests benchmarks
	$(VENV)/bin/ruff format --check blip3 tests benchmarks

bench: env  ## speed and memory benchmarks; results go to benchmarks/README.md
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
