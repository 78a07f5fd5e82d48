"""The nightly trainer: conversation log -> dataset -> LoRA -> evaluation -> gate -> publish.

Modules, each owning one thing:

* `config`    the typed `trainer.toml` (CLI > file > defaults), saved beside every output
* `dataset`   training items from the conversation log and JSONL files, split and measured
* `finetune`  training with llama.cpp's optimizer (`llama_opt`: the C API binding)
* `extract`   the trained weights' difference as a LoRA GGUF
* `evaluate`  validation losses and the publishing gate
* `nightly`   the run for each adapter: lock, stages, run records, signals, exit codes
* `__main__`  the command line: `python -m trainer {dataset,nightly,train,rollback,runs}`

Nothing heavy happens at import.
"""

from __future__ import annotations
