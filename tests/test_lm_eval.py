"""lm-evaluation-harness against the real server: its `local-completions` model (echo + logprobs
loglikelihood requests to /v1/completions) with the `remote` tokenizer backend (this server's
/tokenize, /detokenize and /tokenizer_info), on a small multiple-choice task from a local file.

The harness lives in its own venv (scripts/test-tools.d/lm-eval.sh, run by `make test`); a missing
install fails this test, it never skips. The accuracy the harness reports must equal the one
computed here, in process, from llama.cpp logits on the same token ids.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, ServerProcess

LM_EVAL = ROOT / ".venv" / "tools" / "lm-eval" / "bin" / "lm_eval"

DOCS = [
    {"question": "The colour of the clear daytime sky is", "choices": [" blue", " green", " red"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " seven", " banana"], "answer": 0},
    {"question": "The opposite of hot is", "choices": [" loud", " cold", " square"], "answer": 1},
    {"question": "A cat says", "choices": [" moo", " quack", " meow"], "answer": 2},
    {"question": "Paris is the capital of", "choices": [" France", " Japan", " Brazil"], "answer": 0},
    {"question": "Ice is frozen", "choices": [" sand", " water", " metal"], "answer": 1},
]

TASK = """task: adapter_chat_mini
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.timeout(600)
def test_lm_eval_harness_loglikelihood_task_matches_an_in_process_computation(
    server: ServerProcess, model_path: Path, tmp_path: Path
) -> None:
    assert LM_EVAL.exists(), f"{LM_EVAL} is missing: run `bash scripts/test-tools.d/lm-eval.sh` (make test does)"
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mini.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    proc = subprocess.run(
        [str(LM_EVAL), "--model", "local-completions", "--model_args",
         f"model=base,base_url={server.url}/v1/completions,tokenizer_backend=remote,num_concurrent=2,max_retries=1",
         "--tasks", "adapter_chat_mini", "--include_path", str(tasks), "--output_path", str(out), "--batch_size", "1"],
        capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = results["results"]["adapter_chat_mini"]["acc,none"]

    from trainer.llama_opt import InferenceSession

    correct = 0
    with InferenceSession(model_path, n_ctx=256, threads=1) as inf:
        for d in DOCS:
            ctx = inf.tokenize(d["question"], add_special=False, parse_special=True)
            scores = []
            for choice in d["choices"]:  # as the harness encodes a (context, continuation) pair
                whole = inf.tokenize(d["question"] + choice, add_special=False, parse_special=True)
                nll = inf.window_nll(whole)  # nll[j] scores whole[j + 1]
                scores.append(-float(np.sum(nll[len(ctx) - 1 :])))
            correct += int(np.argmax(scores) == d["answer"])
    assert acc == pytest.approx(correct / len(DOCS)), (acc, correct)
