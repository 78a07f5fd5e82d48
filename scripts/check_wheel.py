"""Check that the installed llama-cpp-python wheel is the one `make` builds (run by `make setup`).

Two things would change what the server answers, and neither shows in the wheel's name:

- llamafile's sgemm switched on when the library loads. It sums in a different order than ggml's
  own dot products, so greedy output would depend on the batch (README "Determinism"). Our build
  compiles it in, switched off (patches/llama-cpp-python-*-3-train-speed.patch with
  -DGGML_CPU_LLAMAFILE_DEFAULT=0); only the trainer's steps switch it on.
- ggml's AMX kernels, which segfault on this machine's CPU (scripts/build_llama_wheel.sh).

Exit status 0 when the wheel is right; otherwise a message saying to rebuild it.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import llama_cpp.llama_cpp as C


def problem() -> str | None:
    info = C.llama_print_system_info().decode()
    if "AMX_INT8 = 1" in info:
        return "llama-cpp-python was built with AMX kernels (scripts/build_llama_wheel.sh): run make clean"
    if "LLAMAFILE = 1" not in info:
        return None  # no sgemm at all: batch-invariant, the trainer just runs slower
    for lib in sorted((Path(C.__file__).parent / "lib").glob("libggml-cpu*.so*")):
        cpu = ctypes.CDLL(str(lib))
        if hasattr(cpu, "ggml_cpu_get_llamafile"):
            on = ctypes.CFUNCTYPE(ctypes.c_bool)(("ggml_cpu_get_llamafile", cpu))()
            return "llama-cpp-python starts with llamafile's sgemm on: run make clean" if on else None
    return "llama-cpp-python was built with llamafile but without patches/ (no run-time switch): run make clean"


if __name__ == "__main__":
    sys.exit(problem())
