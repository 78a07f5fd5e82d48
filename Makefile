# The two commands a newcomer needs (see README):  make serve  |  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
# llama-cpp-python builds from source (no binary wheel on the index). We build it once, without
# llamafile's sgemm (see README "Determinism"), into a wheelhouse outside the repo; later installs
# take it from there in seconds. The wheel's name does not carry build flags, so the wheelhouse
# folder does, and pip's own cache is bypassed for that one build.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS  := -DGGML_LLAMAFILE=OFF
WHEELHOUSE ?= $(HOME)/.cache/adapter-chat/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-nollamafile
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: setup serve test test-slow test-tools lint bench clean

setup: $(VENV)/.installed $(MODEL)

$(VENV)/.installed: pyproject.toml $(WHEELHOUSE)/.built
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall --no-index --find-links $(WHEELHOUSE) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/python -m pip install --find-links $(WHEELHOUSE) -e '.[test]'
	$(BIN)/python -c "import llama_cpp.llama_cpp as C; import sys; sys.exit(0 if not C.llama_print_system_info().decode().count('LLAMAFILE = 1') else 'llama-cpp-python was built with llamafile: run make clean')"
	touch $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(WHEELHOUSE)/.built: | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --no-deps --no-cache-dir \
		--no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELHOUSE)
	touch $@

$(MODEL): $(VENV)/.installed
	$(BIN)/python scripts/fetch_model.py

serve: setup
	$(BIN)/python -m server $(ARGS)

# Outside tools the tests drive (Debian chromium, promtool, ...): scripts/test-tools.d/
test-tools: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/setup_test_tools.sh

test: setup test-tools
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# Lint with the project's ruff config (pyproject.toml); not part of `make test`.
lint: setup
	$(BIN)/pip install -q 'ruff>=0.6'
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/bench_serve.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
