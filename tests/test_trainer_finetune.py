"""Training through llama.cpp's training API on a tiny random llama model."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import gguf
import pytest

from tests.tinymodel import make_tiny_llama, pirate_texts
from trainer.finetune import (
    ConsoleProgress,
    JsonlWriter,
    TrainConfig,
    TrainingInterrupted,
    f32_base,
    make_windows,
    train,
)
from trainer.llama_opt import InferenceSession

pytestmark = pytest.mark.timeout(120)
# One thread: the tiny model gains nothing from two, and llama.cpp's OpenMP workers spin-wait,
# which makes two-thread runs very slow whenever other processes share the two cores.
THREADS = 1
EVENT_KEYS = {"step", "total_steps", "loss", "tokens_per_s", "eta_s", "lr", "epoch"}


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base whose block matrices are Q8_0, like a served quantized base."""
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-q8.gguf", quantize=True)


def test_loss_goes_down_and_progress_is_reported(tiny_q8: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(base_model=tiny_q8, cache_dir=tmp_path / "cache", epochs=4, lr=5e-2, threads=THREADS, method="full", optimizer="sgd")
    events: list[dict] = []
    console = io.StringIO()
    with JsonlWriter(tmp_path / "progress.jsonl") as jsonl:
        result = train(cfg, pirate_texts(range(10)) * 2, callbacks=[events.append, jsonl, ConsoleProgress(console)])

    # the loss falls epoch after epoch, and by a lot overall
    assert len(result.epoch_losses) == 4
    assert all(b < a for a, b in zip(result.epoch_losses, result.epoch_losses[1:])), result.epoch_losses
    assert result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
    assert result.final_loss < result.first_loss

    # one event per step, plain dicts with the documented keys, numbered 1..total
    assert [e["step"] for e in events] == list(range(1, result.steps + 1))
    assert all(EVENT_KEYS <= set(e) and e["total_steps"] == result.steps for e in events)
    assert events[-1]["epoch"] == 4 and events[-1]["eta_s"] == 0.0
    lines = (tmp_path / "progress.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, result.steps + 1))
    assert "tok/s" in console.getvalue() and f"{result.steps}/{result.steps}" in console.getvalue()
    assert result.tokens == result.steps * cfg.n_ctx and result.tokens_per_s > 0

    # the trained model is an FP32 GGUF llama.cpp can load, and it fits the training data better
    reader = gguf.GGUFReader(result.trained)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    windows = None
    losses = {}
    for name, path in (("base", result.base_f32), ("trained", result.trained)):
        with InferenceSession(path, threads=THREADS) as s:
            windows = windows or make_windows([s.tokenize(t) for t in pirate_texts(range(10))], 256)
            losses[name] = float(s.window_nll(windows[0]).mean())
    assert losses["trained"] < losses["base"] - 1.0, losses


def test_stop_ends_training_at_the_next_step(tiny_q8: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    seen: list[int] = []

    def press_ctrl_c_after_two(event: dict) -> None:
        seen.append(event["step"])
        if event["step"] == 2:
            stop.set()

    cfg = TrainConfig(base_model=tiny_q8, cache_dir=tmp_path / "cache", epochs=5, lr=2e-2, threads=THREADS, method="full", optimizer="sgd")
    out = tmp_path / "trained.gguf"
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, pirate_texts(range(12)), callbacks=[press_ctrl_c_after_two], stop=stop, out_path=out)
    assert seen == [1, 2]
    assert info.value.steps_done == 2 and info.value.total_steps > 2
    assert not out.exists()


def test_fp32_base_is_cached_by_sha256(tiny_q8: Path, tmp_path: Path) -> None:
    first, sha = f32_base(tiny_q8, tmp_path)
    mtime = first.stat().st_mtime_ns
    again, sha2 = f32_base(tiny_q8, tmp_path)
    assert again == first and sha2 == sha and again.stat().st_mtime_ns == mtime
    assert first.name.startswith(sha)
    src = {t.name: t for t in gguf.GGUFReader(tiny_q8).tensors}
    out = {t.name: t for t in gguf.GGUFReader(first).tensors}
    assert set(src) == set(out)
    q = src["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0
    expected = gguf.quants.dequantize(q.data, q.tensor_type)
    assert (out["blk.0.attn_q.weight"].data == expected).all()


def test_config_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig(base_model=tmp_path / "m.gguf", cache_dir=tmp_path, n_ctx=300, optimizer="lion", epochs=0)
    msg = str(info.value)
    assert "n_ctx" in msg and "optimizer" in msg and "epochs" in msg
    with pytest.raises(ValueError, match="windows"):
        TrainConfig(base_model=tmp_path / "m.gguf", cache_dir=tmp_path, windows="sliding")


def test_stream_windows_are_todays_path_every_token_a_target() -> None:
    """``windows = "stream"`` (kept to benchmark against): items concatenated and cut across their
    boundaries, every next token a label, one sequence per window, cut items counted."""
    from adapter_chat.chat_template import TokenizedConversation
    from trainer.finetune import _stream

    convs = [TokenizedConversation(list(range(k * 100, k * 100 + 100)), [False] * 100) for k in range(6)]
    p = _stream(convs, 256)
    assert len(p.windows) == 3 and p.items_cut == 2  # boundaries at 256 and 512 fall inside items
    w = p.windows[0]
    assert w.labels == w.inputs[1:] + [256] and set(w.seq_ids) == {0}
    assert p.labelled_tokens == 3 * 256


def test_windows_cover_every_token_without_padding() -> None:
    stream = list(range(600))
    windows = make_windows([stream[:250], stream[250:]], 256)
    assert len(windows) == 3 and all(len(w) == 257 for w in windows)
    labels = [t for w in windows for t in w[1:]]
    assert set(stream[1:]) <= set(labels)  # every token after the first is a training target
    assert windows[-1][-1] in stream  # the last window wraps around instead of padding
    assert make_windows([[1, 2, 3]], 256)[0][:6] == [1, 2, 3, 1, 2, 3]
