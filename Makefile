# Everything a fresh machine needs: `make demo` runs the main job on embedded defaults,
# `make test` runs the whole test suite. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a CUDA machine: make TORCH_SPEC='torch==2.13.0' TORCH_INDEX=... setup
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) -m jobs.demo

clean:
	rm -rf $(VENV) demo_output
