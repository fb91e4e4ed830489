# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU wheel on machines without a GPU; an unpinned torch pulls GBs of CUDA packages.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# lmms-eval in an environment of its own (tests/test_lmms_eval.py, README "Evaluate with lmms-eval"):
# lmms-eval 0.7.3 declares torchvision (no build for torch 2.13 on CPU) and ~50 packages its CLI
# never imports here, so it goes in with --no-deps beside what it does import.
EVAL_VENV ?= .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed
LMMS_EVAL ?= lmms-eval==0.7.3

.PHONY: venv eval-venv demo test bench-decode clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH)"
	touch $(STAMP)

eval-venv: $(EVAL_STAMP)

$(EVAL_STAMP): pyproject.toml Makefile lma/lmms_eval/requirements.txt
	test -x $(EVAL_VENV)/bin/python || $(PY) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install -q --upgrade pip
	$(EVAL_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(EVAL_VENV)/bin/python -m pip install -q -r lma/lmms_eval/requirements.txt "$(TORCH)"
	$(EVAL_VENV)/bin/python -m pip install -q --no-deps -e . "$(LMMS_EVAL)"
	touch $(EVAL_STAMP)

demo: venv
	$(BIN)/python -m jobs.demo --output demo-out

test: venv eval-venv
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench-decode: venv
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) $(EVAL_VENV) demo-out .pytest_cache
