# The two commands a newcomer needs (see README):  make serve  |  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
# llama-cpp-python builds from source (no binary wheel on the index): use every core;
# pip keeps the built wheel in its cache, so later installs take seconds.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: setup serve test test-slow bench clean

setup: $(VENV)/.installed $(MODEL)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

$(MODEL): $(VENV)/.installed
	$(BIN)/python scripts/fetch_model.py

serve: setup
	$(BIN)/python -m server $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

bench: setup
	$(BIN)/python bench/bench_serve.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
