"""The adapter probe: load a LoRA file in a throw-away process before the server trusts it.

Owns the one check llama.cpp itself makes of an adapter: ``probe_adapter`` runs
``python -m adapter_chat.probe MODEL ADAPTER [N_GPU_LAYERS]``, which loads the base as the engine
loads it and calls ``llama_adapter_lora_init`` on the file. A file that crashes llama.cpp's loader
takes down the probe, never the server; the catalog (``server/adapter_catalog.py``) and the upload
endpoint (``server/adapter_upload.py``) refuse what the probe refuses, with its reason.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import llama_cpp._logger as llama_logger
import llama_cpp.llama_cpp as C

from adapter_chat.llama_model import ModelLoadError, load_model, model_params


def probe_adapter(
    model_path: Path, adapter_path: Path, *, n_gpu_layers: int = 0, timeout_s: float = 120.0
) -> str | None:
    """None when llama.cpp loads the adapter in a child process (the base loaded as the engine
    loads it, ``n_gpu_layers`` on the GPU); otherwise why not."""
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "adapter_chat.probe",
                str(model_path),
                str(adapter_path),
                str(n_gpu_layers),
            ],
            capture_output=True,
            timeout=timeout_s,
            text=True,
        )
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not finish loading the adapter within {timeout_s:.0f}s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"llama.cpp crashed loading the adapter (signal {-proc.returncode})"
    detail = proc.stdout.strip().splitlines()[-1:] or ["no detail"]
    return f"llama.cpp refused the adapter: {detail[0][:200]}"


def _probe_main(model_path: str, adapter_path: str, n_gpu_layers: int = 0) -> int:
    llama_logger.set_verbose(False)
    C.llama_backend_init()
    params = model_params(n_gpu_layers)
    print(f"n_gpu_layers {params.n_gpu_layers}", file=sys.stderr)
    try:
        model = load_model(model_path, params)
    except ModelLoadError:
        print("base model failed to load")
        return 2
    adapter = C.llama_adapter_lora_init(model, adapter_path.encode())
    if not adapter:
        print("llama_adapter_lora_init returned NULL")
        return 3
    C.llama_adapter_lora_free(adapter)
    C.llama_model_free(model)
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (3, 4):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        sys.exit(_probe_main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 0))
    sys.exit("usage: python -m adapter_chat.probe MODEL ADAPTER [N_GPU_LAYERS]")
