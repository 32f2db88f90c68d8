# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv if missing, install, run `layerfreeze demo`
#   make test   -- create .venv if missing, install, run ruff, mypy, the strict docs build
#                  and the test suite (the wheel check alone: .venv/bin/python -m pytest -m wheel)
#   make docs   -- build the documentation site into build/site (warnings are errors)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned for set-up only (the package accepts torch>=2.4): on these
# machines 2.13.0 is a local CPU build, any other version is a large download.
TORCH ?= torch==2.13.0

.PHONY: demo test lint docs bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[all,dev]' $(TORCH)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/layerfreeze demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/mypy src

docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict --quiet

test: lint docs
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
