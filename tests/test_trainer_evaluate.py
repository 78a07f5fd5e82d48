"""Evaluation through llama.cpp (base, trained FP32, adapter on the served base), the base-results
cache, and the gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapter_chat.chat_template import ChatTemplate
from adapter_chat.gguf_info import BaseModelInfo
from tests.tinymodel import QUESTIONS, chatml, make_tiny_llama, pirate_texts
from trainer.base_cache import BaseCache
from trainer.evaluate import EvalReport, ModelScore, evaluate, gate
from trainer.extract import Extraction, extract_lora, save_lora
from trainer.finetune import TrainConfig, TrainedModel, train
from trainer.task_eval import answer_prompts, score_task

pytestmark = pytest.mark.timeout(120)
# One thread: the tiny model gains nothing from two, and llama.cpp's OpenMP workers spin-wait,
# which makes two-thread runs very slow whenever other processes share the two cores.
THREADS = 1


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainedModel, Path]:
    tmp = tmp_path_factory.mktemp("evaluate")
    base = make_tiny_llama(tmp / "tiny-q8.gguf", quantize=True)
    trained = train(TrainConfig(base_model=base, cache_dir=tmp / "cache", epochs=4, lr=5e-2, threads=THREADS, method="full", optimizer="sgd"), pirate_texts(range(9)) * 2)
    ex = extract_lora(trained.base_f32, trained.trained, fidelity=0.9, max_rank=32)
    adapter = save_lora(ex, tmp / "adapter.gguf", architecture="llama")
    return base, trained, adapter


def test_adapter_beats_base_on_held_out_conversations(run: tuple[Path, TrainedModel, Path]) -> None:
    base, trained, adapter = run
    held_out = pirate_texts(range(9, 12))  # same voice, questions never trained on
    prompts = [[{"role": "user", "content": QUESTIONS[10]}], chatml(QUESTIONS[11])]
    report = evaluate(base, adapter, held_out, trained=trained.trained, prompts=prompts, max_tokens=12, threads=THREADS)

    assert report.n_texts == 3 and report.base.tokens == report.adapter.tokens > 0
    assert report.adapter.loss < report.base.loss - 0.5, report.to_dict()
    assert report.trained is not None and report.trained.loss < report.base.loss - 0.5
    assert report.adapter.perplexity == pytest.approx(np.exp(report.adapter.loss))
    # message lists are rendered with the base model's chat template (SmolLM2's adds its default
    # system prompt), strings are used as-is
    first, second = (s.prompt for s in report.samples)
    assert first.startswith("<|im_start|>system\n") and first.endswith(chatml(QUESTIONS[10]))
    assert second == chatml(QUESTIONS[11])
    assert any(s.adapter != s.base for s in report.samples)

    passed, why = gate(report, margin=0.05)
    assert passed and f"{report.adapter.loss:.4f}" in why and f"{report.base.loss:.4f}" in why
    d = json.loads(json.dumps(report.to_dict()))
    assert d["val_loss_adapter"] == report.adapter.loss and d["samples"][1]["prompt"] == chatml(QUESTIONS[11])


def test_gate_refuses_an_adapter_that_is_worse(run: tuple[Path, TrainedModel, Path], tmp_path: Path) -> None:
    base, trained, adapter = run
    good = extract_lora(trained.base_f32, trained.trained, rank=8)
    # the same update with the opposite sign: it moves the base away from the learnt voice
    reverse = {name: (a, -b) for name, (a, b) in good.pairs.items()}
    bad = Extraction(pairs=reverse, rank=8, alpha=8.0, energy=good.energy)
    bad_path = save_lora(bad, tmp_path / "reverse.gguf", architecture="llama")
    report = evaluate(base, bad_path, pirate_texts(range(9, 12)), threads=THREADS)
    assert report.adapter.loss > report.base.loss
    passed, why = gate(report, margin=0.0)
    assert not passed
    assert why.startswith(f"adapter val loss {report.adapter.loss:.4f} > {report.base.loss:.4f}")


def _report(base: float, adapter: float) -> EvalReport:
    return EvalReport(base=ModelScore(base, np.exp(base), 100, 0.1), adapter=ModelScore(adapter, np.exp(adapter), 100, 0.1))


def test_gate_margins() -> None:
    # relative: adapter <= base * (1 - margin)
    assert gate(_report(2.0, 1.9), margin=0.05)[0]
    assert not gate(_report(2.0, 1.91), margin=0.05)[0]
    assert not gate(_report(2.0, 2.0), margin=0.01)[0]  # no better is not good enough with a margin
    # absolute: adapter <= base - margin (nats)
    assert gate(_report(2.0, 1.9), margin=0.1, mode="absolute")[0]
    assert not gate(_report(2.0, 1.95), margin=0.1, mode="absolute")[0]
    # a diverged adapter never passes
    passed, why = gate(_report(2.0, float("nan")), margin=0.0)
    assert not passed and "non-finite" in why


def test_the_base_cache_gives_the_bases_numbers_and_computes_only_new_items(
    run: tuple[Path, TrainedModel, Path], tmp_path: Path
) -> None:
    """Every night scores the same base: its per-item losses and samples are read back from the
    cache, identical to computing them, and only items not seen before are computed."""
    base, _, adapter = run
    held_out, prompts = pirate_texts(range(9, 12)), [[{"role": "user", "content": QUESTIONS[10]}]]
    fresh = evaluate(base, adapter, held_out, prompts=prompts, max_tokens=8, threads=THREADS)
    with BaseCache(tmp_path / "c.sqlite3", base_sha256="tiny", build="this") as cache:
        first = evaluate(base, adapter, held_out[:2], prompts=prompts, max_tokens=8, threads=THREADS, base_cache=cache)
        second = evaluate(base, adapter, held_out, prompts=prompts, max_tokens=8, threads=THREADS, base_cache=cache)
    assert first.base.cached == 0 and second.base.cached == 2 and second.n_texts == 3
    assert (second.base.loss, second.base.tokens) == (fresh.base.loss, fresh.base.tokens)
    assert second.adapter.loss == fresh.adapter.loss
    assert [s.base for s in second.samples] == [s.base for s in fresh.samples]


def test_cached_base_answers_are_the_answers_the_engine_gives(
    run: tuple[Path, TrainedModel, Path], tmp_path: Path
) -> None:
    """A base answer read from the cache is the one the server's engine gives that prompt now,
    also when the other prompts (and so the engine's context size) differ."""
    base, _, adapter = run
    (tmp_path / "scorer.py").write_text("def said_something(answer):\n    return bool(answer.strip())\n")
    scorer = f"{tmp_path / 'scorer.py'}:said_something"
    template = ChatTemplate.from_model(BaseModelInfo.load(base, sha256="-"))
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[9:12]]
    kw = {"scorer": scorer, "template": template, "max_tokens": 12, "threads": THREADS, "n_examples": 3}
    with BaseCache(tmp_path / "c.sqlite3", base_sha256="tiny", build="this") as cache:
        first = score_task(base, adapter, prompts, base_cache=cache, **kw)
        again = score_task(base, adapter, prompts[1:2], base_cache=cache, **kw)
    [fresh] = answer_prompts(base, None, prompts[1:2], template=template, max_tokens=12, threads=THREADS)
    assert (first.base_cached, again.base_cached) == (0, 1)
    assert again.examples[0]["base"] == fresh == first.examples[1]["base"]
    assert again.examples[0]["adapter"] == first.examples[1]["adapter"]
