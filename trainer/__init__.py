"""The nightly trainer: conversation log -> dataset -> LoRA -> evaluation -> gate -> publish.

Modules, each owning one thing:

* `config`    the typed `trainer.toml` (CLI > file > defaults), saved beside every output
* `dataset`   training items from the conversation log and JSONL files, split and measured
* `packing`   items as token ids with a loss mask (the one tokenization), packed into windows
* `finetune`  training with llama.cpp's optimizer (`llama_opt`: the C API binding)
* `extract`   a full finetune's weight change as a LoRA GGUF (the measured alternative)
* `evaluate`  validation losses and the publishing gate
* `task_eval` greedy answers to held-out prompts through the engine, scored
* `stages`    one adapter's stages (dataset, train, extract, evaluate, publish), typed results
* `nightly`   the run for each adapter: lock, run records, signals, exit codes
* `progress`  progress lines for logs that are not a terminal
* `__main__`  the command line: `python -m trainer {dataset,nightly,train,import,rollback,runs}`

It stands on `adapter_chat` (the adapter format, the log, the tokenization, the engine) and never
imports the server.

Nothing heavy happens at import.
"""

from __future__ import annotations
