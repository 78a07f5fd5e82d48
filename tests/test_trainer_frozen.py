"""``[train] frozen_cache``: the frozen lower blocks computed once per item and kept between
runs, a step on the upper blocks only. Real llama.cpp training (the patched wheel) on a tiny
random four-block model: the upper-blocks step must be the whole model's step."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.tinymodel import ANSWERS, QUESTIONS, make_tiny_llama
from trainer.finetune import TrainConfig, initial_lora, train
from trainer.frozen import KEEP_DAYS, FrozenBlocks, n_blocks, runs, shift_lora, shift_name, top_model
from trainer.llama_opt import BlockOutputs, InferenceSession, TrainSession
from trainer.packing import IGNORE_INDEX, Window

pytestmark = pytest.mark.timeout(180)
THREADS = 1
TARGETS = ("attn_q", "attn_v", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Chat:
    text: str
    messages: tuple[dict, ...]


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny4-f32.gguf", n_layer=4)


def _packed_window(n_ctx: int = 256) -> Window:
    """Three random items packed with their own sequence ids, answers their second halves, padding after."""
    rng = np.random.default_rng(7)
    inputs: list[int] = []
    labels: list[int] = []
    seq_ids: list[int] = []
    for k, n in enumerate((60, 90, 70)):
        item = rng.integers(10, 2048, size=n + 1).tolist()
        inputs += item[:-1]
        labels += [item[j + 1] if j >= n // 2 else IGNORE_INDEX for j in range(n)]
        seq_ids += [k] * n
    pad = n_ctx - len(inputs)
    return Window(inputs + [0] * pad, labels + [IGNORE_INDEX] * pad, seq_ids + [3] * pad)


def test_names_shift_by_block_only() -> None:
    assert shift_name("blk.20.attn_q.weight", -20) == "blk.0.attn_q.weight"
    assert shift_name("blk.3.ffn_down.weight.lora_a", 17) == "blk.20.ffn_down.weight.lora_a"
    assert shift_name("token_embd.weight", -20) == "token_embd.weight"
    assert list(runs([0, 0, 1, 1, 1, 2])) == [(0, 2), (2, 5), (5, 6)]


def test_the_upper_blocks_model_holds_the_top_blocks_renumbered(tiny4: Path, tmp_path: Path) -> None:
    top = top_model(tiny4, 2, tmp_path / "top.gguf")
    assert n_blocks(top) == 2
    src = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tiny4).tensors}
    dst = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(top).tensors}
    assert "blk.2.attn_q.weight" not in dst and "token_embd.weight" in dst
    assert np.array_equal(dst["blk.0.attn_q.weight"], src["blk.2.attn_q.weight"])
    assert np.array_equal(dst["blk.1.ffn_down.weight"], src["blk.3.ffn_down.weight"])


def test_block_outputs_feed_the_upper_blocks_to_the_whole_models_logits(tiny4: Path, tmp_path: Path) -> None:
    """What BlockOutputs captures is the residual stream the upper blocks take: the upper-blocks
    model fed it in a training step (B = 0, ~no update) reports the whole model's loss."""
    w = _packed_window()
    init = initial_lora(tiny4, TARGETS, 4, 8.0, 0, tmp_path / "init.gguf", architecture="llama", top_layers=2)
    with InferenceSession(tiny4, n_ctx=256, threads=THREADS) as inf:
        expected = []
        for a, b in runs(w.seq_ids[:220]):
            nll = inf.window_nll(w.inputs[a:b] + [w.labels[b - 1]])
            keep = [t >= 0 for t in w.labels[a:b]]
            expected += list(nll[keep])
    with BlockOutputs(tiny4, block=1, n_ctx=256, threads=THREADS) as blocks:
        embd = np.concatenate([blocks(w.inputs[a:b]) for a, b in runs(w.seq_ids)])
        again = blocks(w.inputs[:60])
    assert embd.shape == (256, 64) and np.isfinite(embd).all()
    assert np.array_equal(again, embd[:60])  # a sequence alone: the same rows every time
    top = top_model(tiny4, 2, tmp_path / "top.gguf")
    shifted = shift_lora(init, tmp_path / "init-top.gguf", -2, architecture="llama")
    with TrainSession(top, n_ctx=256, threads=THREADS, optimizer="sgd", lr=1e-9, lora=shifted, block_offset=2) as s:
        loss = s.step(w.inputs, w.labels, w.seq_ids, embd=embd)
        # without the lower blocks' output the upper ones see token embeddings: another loss
        raw = s.step(w.inputs, w.labels, w.seq_ids)
    assert loss == pytest.approx(float(np.mean(expected)), rel=2e-3), (loss, np.mean(expected), raw)
    assert abs(raw - loss) > 0.01


def test_upper_blocks_training_gives_the_whole_models_adapter(tiny4: Path, tmp_path: Path) -> None:
    """Three AdamW steps with the frozen-blocks cache give the losses and the LoRA of three
    steps on the whole model (same data, same init), up to rounding; the adapter is named as
    the base's blocks."""
    w = _packed_window()
    init = initial_lora(tiny4, TARGETS, 4, 8.0, 0, tmp_path / "init.gguf", architecture="llama", top_layers=2)
    with TrainSession(tiny4, n_ctx=256, threads=THREADS, optimizer="adamw", lr=1e-2, lora=init) as s:
        whole = [s.step(w.inputs, w.labels, w.seq_ids) for _ in range(3)]
        whole_pairs = s.lora_pairs()
    frozen = FrozenBlocks(tiny4, base_sha256="0" * 64, cache_dir=tmp_path / "cache", top_layers=2, n_ctx=256,
                          threads=THREADS)  # fmt: skip
    stats = frozen.prepare([w])
    assert (stats.cached, stats.computed) == (0, 4)  # three items and the padding
    shifted = shift_lora(init, tmp_path / "init-top.gguf", -2, architecture="llama")
    with TrainSession(frozen.top_model, n_ctx=256, threads=THREADS, optimizer="adamw", lr=1e-2, lora=shifted,
                      block_offset=2) as s:  # fmt: skip
        upper = [s.step(w.inputs, w.labels, w.seq_ids, embd=frozen.window(w)) for _ in range(3)]
        upper_pairs = s.lora_pairs()
    assert whole[-1] < whole[0] - 0.05  # it trains
    assert upper == pytest.approx(whole, rel=1e-3), (upper, whole)
    assert sorted(upper_pairs) == sorted(whole_pairs) and "blk.3.ffn_down.weight" in upper_pairs
    for name, (a, b) in whole_pairs.items():
        ua, ub = upper_pairs[name]
        assert np.allclose(ua, a, atol=1e-4) and np.allclose(ub, b, atol=1e-4), name
        assert np.abs(b).max() > 1e-3  # B moved off zero


def test_the_cache_is_reused_by_the_next_run_and_expires_unused_files(tiny4: Path, tmp_path: Path) -> None:
    def chat(i: int) -> Chat:
        return Chat(text="", messages=({"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": ANSWERS[i]}))

    chats = [chat(i) for i in range(8)]
    cfg = TrainConfig(base_model=tiny4, cache_dir=tmp_path / "cache", epochs=2, lr=1e-2, rank=4, alpha=8.0,
                      threads=THREADS, targets=TARGETS, top_layers=2, frozen_cache=True)  # fmt: skip
    first = train(cfg, chats)
    assert first.packing["frozen"]["cached"] == 0 and first.packing["frozen"]["computed"] > 0
    assert first.epoch_losses[-1] < first.epoch_losses[0]
    names = {t.name for t in gguf.GGUFReader(first.adapter).tensors}
    assert "blk.3.attn_q.weight.lora_a" in names and not any(n.startswith(("blk.0.", "blk.1.")) for n in names)
    # the next run with one item more computes only what is new, and trains the same way
    second = train(cfg, [*chats, chat(9)]).packing["frozen"]
    assert second["computed"] <= 2  # the new item, and a padding run of another length
    assert second["cached"] >= first.packing["frozen"]["computed"] - 1
    # against the whole model, same config: the same losses up to rounding
    whole = train(TrainConfig(**{**cfg.__dict__, "frozen_cache": False, "cache_dir": tmp_path / "c2"}), chats)
    assert first.epoch_losses == pytest.approx(whole.epoch_losses, rel=2e-3)
    # files unused for KEEP_DAYS are deleted when the cache opens
    files = list((tmp_path / "cache" / "frozen").glob("*/*.npy"))
    old = time.time() - (KEEP_DAYS + 1) * 86400
    os.utime(files[0], (old, old))
    FrozenBlocks(tiny4, base_sha256="1" * 64, cache_dir=tmp_path / "cache", top_layers=2, n_ctx=256, threads=THREADS)
    assert not files[0].exists() and files[1].exists()
