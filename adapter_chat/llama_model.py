"""llama.cpp model params for every model load, in the server and the trainer (binding).

Owns the GPU offload decision: ``n_gpu_layers`` layers go to a GPU; a CPU-only build of llama.cpp
ignores them, so say so once per load and run on the CPU."""

from __future__ import annotations

import logging
from typing import Any

import llama_cpp.llama_cpp as C

log = logging.getLogger(__name__)


def model_params(n_gpu_layers: int) -> Any:
    """``llama_model_default_params()`` with ``n_gpu_layers`` set (warns on a CPU-only build)."""
    params = C.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    if n_gpu_layers and not C.llama_supports_gpu_offload():
        log.warning(
            "n_gpu_layers=%d asked for, but this llama-cpp-python build has no GPU backend: running on "
            "the CPU (build the CUDA wheel with `make setup GPU=cuda`)", params.n_gpu_layers,
        )  # fmt: skip
    return params
