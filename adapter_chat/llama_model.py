"""Every llama.cpp model load, in the server and the trainer (binding).

Owns the model params (the GPU offload decision: ``n_gpu_layers`` layers go to a GPU; a CPU-only
build of llama.cpp ignores them, so say so once per load and run on the CPU) and the load itself,
with one error when llama.cpp returns no model. The engine, its probe and the trainer's binding
all load through `load_model`; `native_build_id` names the build they run."""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
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


class ModelLoadError(RuntimeError):
    """llama.cpp returned no model for a file (missing, not a GGUF, an unknown architecture)."""


def load_model(path: Any, params: Any = None, *, n_gpu_layers: int = 0, what: str = "model") -> Any:
    """``llama_model_load_from_file`` with ``params`` (default: `model_params(n_gpu_layers)`);
    raises ModelLoadError naming the file. The caller frees it (``llama_model_free``)."""
    params = model_params(n_gpu_layers) if params is None else params
    model = C.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load the {what} {path}")
    return model


@functools.cache
def native_build_id() -> str:
    """The identity of the llama.cpp build this process runs: a sha256 (16 hex digits) of the
    shared libraries in llama-cpp-python's ``lib/`` folder and of ``llama_print_system_info``.

    Two builds may round differently, so a result computed with one (a greedy answer, a loss) is
    reused only under the same id (``trainer.base_cache``)."""
    h = hashlib.sha256(C.llama_print_system_info())
    for path in sorted((Path(C.__file__).parent / "lib").glob("lib*.so*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
