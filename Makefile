# The two commands a newcomer needs (see README):  make serve  |  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
# llama-cpp-python builds from source (no binary wheel on the index). We build it once into a
# wheelhouse outside the repo; later installs take it from there in seconds. llamafile's sgemm is
# compiled in but starts switched off (patches/llama-cpp-python-*-3-train-speed.patch): serving needs
# ggml's batch-invariant kernels (README "Determinism"); only the trainer's steps switch it on. The wheel's name does not carry build flags or patches, so the
# wheelhouse folder does (a changed patch builds a new wheel), and pip's cache is bypassed.
# patches/ holds our fixes to the vendored llama.cpp (training: see patches/README.md).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS  := -DGGML_LLAMAFILE=ON -DLLAVA_BUILD=OFF
LLAMA_CFLAGS      := -DGGML_CPU_LLAMAFILE_DEFAULT=0
# `make setup GPU=cuda`: llama.cpp's CUDA backend too (needs the CUDA toolkit's nvcc; set
# CUDA_ARCHS, e.g. 86, to build for one GPU generation only, which is much faster). The flags are
# part of the build id below, so the CUDA wheel gets its own wheelhouse folder.
GPU ?=
ifeq ($(GPU),cuda)
LLAMA_CMAKE_ARGS  += -DGGML_CUDA=on $(if $(CUDA_ARCHS),-DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS))
else ifneq ($(GPU),)
$(error GPU=$(GPU) is not supported: use GPU=cuda, or leave it unset for the CPU build)
endif
LLAMA_PATCHES     := $(sort $(wildcard patches/llama-cpp-python-$(LLAMA_CPP_VERSION)-*.patch))
LLAMA_BUILD_ID    := $(shell (echo '$(LLAMA_CMAKE_ARGS) $(LLAMA_CFLAGS)'; cat $(LLAMA_PATCHES) scripts/build_llama_wheel.sh) | sha256sum | cut -c1-10)
WHEELHOUSE ?= $(HOME)/.cache/adapter-chat/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_BUILD_ID)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: setup serve test test-slow test-tools lint bench demo clean FORCE

setup: $(VENV)/.installed $(MODEL)

# Which wheelhouse the venv holds: rewritten only when it changes, so switching between the CPU
# and the CUDA build (either way) reinstalls llama-cpp-python, and an unchanged one does nothing.
$(VENV)/.wheelhouse: FORCE | $(BIN)/python
	@echo '$(WHEELHOUSE)' | cmp -s - $@ || echo '$(WHEELHOUSE)' > $@

$(VENV)/.installed: pyproject.toml $(WHEELHOUSE)/.built $(VENV)/.wheelhouse
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall --no-index --find-links $(WHEELHOUSE) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/python -m pip install --find-links $(WHEELHOUSE) -e '.[test]'
	$(BIN)/python scripts/check_wheel.py
	touch $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# No file prerequisites: the folder's name already hashes the patches, the script and the flags
# (file mtimes would rebuild in every fresh clone).
$(WHEELHOUSE)/.built: | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CFLAGS="$(LLAMA_CFLAGS)" bash scripts/build_llama_wheel.sh $(BIN)/python $(LLAMA_CPP_VERSION) $(WHEELHOUSE)
	touch $@

$(MODEL): $(VENV)/.installed
	$(BIN)/python scripts/fetch_model.py

serve: setup
	$(BIN)/python -m server $(ARGS)

# Outside tools the tests drive (Debian chromium, promtool, ...): scripts/test-tools.d/
test-tools: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/setup_test_tools.sh

test: setup test-tools lint
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# ruff with the project's config, then the import contracts (pyproject.toml [tool.importlinter]):
# server/ and trainer/ stand on adapter_chat/ and never import each other. `make test` runs it first.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The fractional-CTO example end to end: its data, one nightly for cto-house-style (train, gate,
# publish into ./adapters), then the server with the example's routes: open /playground and put
# cto-prompt and cto-finetuned side by side. examples/fractional-cto/README.md says how long it takes.
DEMO := examples/fractional-cto
demo: setup $(DEMO)/data/conversations.jsonl
	$(BIN)/python -m trainer nightly --config $(DEMO)/trainer.toml
	$(BIN)/python -m server --prompts-dir $(DEMO) --db-path $(DEMO)/data/conversations.sqlite3 $(ARGS)

$(DEMO)/data/conversations.jsonl: | $(VENV)/.installed
	rm -f $(DEMO)/data/conversations.sqlite3
	$(BIN)/python $(DEMO)/generate.py --log $(DEMO)/data/conversations.sqlite3

bench: setup
	$(BIN)/python bench/bench_serve.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
