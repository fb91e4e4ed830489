# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU wheel on machines without a GPU; an unpinned torch pulls GBs of CUDA packages.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test bench-decode clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH)"
	touch $(STAMP)

demo: venv
	$(BIN)/python -m jobs.demo --output demo-out

test: venv
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench-decode: venv
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
