# Everything a fresh machine needs: `make demo` runs the main job on embedded defaults,
# `make test` runs the linter, the formatter check and the type checker (`make lint`), then the whole
# test suite. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a CUDA machine: make TORCH_SPEC='torch==2.13.0' TORCH_INDEX=... setup
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup lint test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# ruff and mypy settings: pyproject.toml. Fails on the first violation, before any test runs.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

demo: setup
	$(PY) -m jobs.demo

clean:
	rm -rf $(VENV) demo_output
