"""Training that teaches: correct optimizer steps, assistant-only loss, a LoRA trained directly,
resume from a checkpoint. Real llama.cpp training (the patched wheel) on tiny random models."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.tinymodel import ANSWERS, QUESTIONS, make_tiny_llama
from trainer.finetune import TrainConfig, TrainingInterrupted, initial_lora, train
from trainer.llama_opt import InferenceSession, TrainSession, llamafile_available, llamafile_on
from trainer.packing import IGNORE_INDEX

pytestmark = pytest.mark.timeout(180)
THREADS = 1


@dataclass(frozen=True)
class Chat:
    text: str
    messages: tuple[dict, ...]


def pirate_chats(indices) -> list[Chat]:
    return [
        Chat(text="", messages=({"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": ANSWERS[i]}))
        for i in indices
    ]


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-q8.gguf", quantize=True)


LR_SGEMM = 1.0


def _window(n: int, seed: int, n_vocab: int = 2048) -> list[int]:
    return np.random.default_rng(seed).integers(10, n_vocab, size=n + 1).tolist()


def test_each_sgd_step_applies_its_own_gradient_only(tiny_f32: Path) -> None:
    """Same window, SGD, small lr, four steps: every step moves the weights as much as the first.

    Before patches/llama-cpp-python-0.3.36-1-training.patch, ggml-opt never reset the gradient
    accumulators with llama.cpp's dynamic graphs, so step k applied the sum of k gradients
    (measured: 1.00, 2.00, 3.00, 3.99 times the first step)."""
    window = _window(256, seed=1)
    with TrainSession(tiny_f32, n_ctx=256, threads=THREADS, optimizer="sgd", lr=1e-4, targets=("ffn_down",)) as s:
        name = "blk.0.ffn_down.weight"
        before = s.tensor(name)
        deltas = []
        for _ in range(4):
            s.step(window)
            after = s.tensor(name)
            deltas.append(float(np.linalg.norm(after - before)))
            before = after
    ratios = [d / deltas[0] for d in deltas]
    assert deltas[0] > 0
    assert all(abs(r - 1.0) <= 0.05 for r in ratios), ratios


@pytest.mark.parametrize("masked", [False, True], ids=["every-position", "a-third-labelled"])
def test_an_sgd_step_lowers_the_loss_as_its_gradient_predicts(tiny_f32: Path, masked: bool) -> None:
    """The gradient is the loss's gradient: after one SGD step of size lr the loss falls by
    lr * |g|^2 to first order, where g = -(weight change) / lr over every trained tensor.

    Only blk.*.ffn_down trains, so each gradient reaches its block through the frozen matrices
    above it: the backward through frozen F32 matrices (mul_mat on their transposed copy since
    patches/llama-cpp-python-0.3.36-3-train-speed.patch, out_prod before) and the attention."""
    window = _window(256, seed=11)
    inputs, labels = window[:-1], list(window[1:])
    if masked:  # logits only at the labelled positions (llama_opt_set_labelled_outputs)
        labels = [t if j % 3 == 0 else IGNORE_INDEX for j, t in enumerate(labels)]
    lr = 1e-3
    with TrainSession(tiny_f32, n_ctx=256, threads=THREADS, optimizer="sgd", lr=lr, targets=("ffn_down",)) as s:
        before = {n: s.tensor(n) for n in s.trainable}
        loss0 = s.step(inputs, labels)  # the loss at the weights before the step, then the step
        g2 = sum(float(((s.tensor(n) - before[n]) ** 2).sum()) for n in s.trainable) / lr**2
        s.set_lr(1e-12)  # ~no update (ggml-opt needs lr > 0)
        loss1 = s.step(inputs, labels)
    predicted = lr * g2
    assert len(before) >= 2 and predicted > 1e-3, (len(before), predicted)  # a drop float32 resolves
    assert loss0 - loss1 == pytest.approx(predicted, rel=0.01), (loss0, loss1, predicted)


def test_logits_at_labelled_positions_only_give_the_same_step(tiny_f32: Path, tmp_path: Path) -> None:
    """A packed window with a third of its positions labelled and unlikelihood targets: the same
    SGD steps with logits only at the labelled positions (the default) and at every position give
    the same losses and the same LoRA up to float32 rounding, so the output rows are mapped back
    to their positions and labels right."""
    init = initial_lora(tiny_f32, ("attn_q", "ffn_down"), 4, 8.0, 0, tmp_path / "init.gguf", architecture="llama")
    window = _window(256, seed=13)
    labels = [t if (j // 20) % 3 == 1 else IGNORE_INDEX for j, t in enumerate(window[1:])]
    seq_ids = [j // 100 for j in range(256)]
    negatives = [(j, (t + 7) % 2048) for j, t in enumerate(labels) if t >= 0 and j % 5 == 0]
    runs = {}
    for only in (False, True):
        with TrainSession(tiny_f32, n_ctx=256, threads=THREADS, optimizer="sgd", lr=LR_SGEMM, lora=init,
                          labelled_outputs=only) as s:  # fmt: skip
            assert s.labelled_outputs == only
            losses = [s.step(window[:-1], labels, seq_ids, negatives, 5.0) for _ in range(3)]
            runs[only] = (losses, {n: s.tensor(n) for n in s.trainable})
    (l0, t0), (l1, t1) = runs[False], runs[True]
    assert l1 == pytest.approx(l0, rel=1e-4)
    assert l1[-1] < l1[0] - 0.01, l1
    for n in t0:
        assert np.abs(t1[n] - t0[n]).max() <= 1e-3 * max(1e-3, float(np.abs(t0[n]).max())), n


@pytest.mark.skipif(not llamafile_available(), reason="wheel without llamafile's sgemm behind the run-time switch")
def test_sgemm_in_the_training_step_changes_rounding_only_and_is_off_after_it(tiny_f32: Path, tmp_path: Path) -> None:
    """The trainer switches llamafile's sgemm on for its steps only: the same SGD steps with and
    without it give the same losses and tensors up to float32 rounding, and after every step the
    switch is off again, so the server's and the evaluation's matmuls stay batch-invariant."""
    init = initial_lora(tiny_f32, ("attn_q", "ffn_down"), 4, 8.0, 0, tmp_path / "init.gguf", architecture="llama")
    window = _window(256, seed=12)
    runs = {}
    assert not llamafile_on()
    for fast in (False, True):
        with TrainSession(tiny_f32, n_ctx=256, threads=THREADS, optimizer="sgd", lr=LR_SGEMM, lora=init, llamafile=fast) as s:
            losses = [s.step(window) for _ in range(3)]
            assert not llamafile_on()
            runs[fast] = (losses, {n: s.tensor(n) for n in s.trainable})
    (l0, t0), (l1, t1) = runs[False], runs[True]
    # sgemm really ran: it rounds differently (it did not while the switch was set through another
    # copy of libggml-cpu than the one llama.cpp loads)
    assert l1 != l0 or any(not np.array_equal(t1[n], t0[n]) for n in t0)
    assert l1 == pytest.approx(l0, rel=1e-4)
    assert l1[-1] < l1[0] - 0.01, l1  # the steps trained something
    for n in t0:
        assert np.abs(t1[n] - t0[n]).max() <= 1e-3 * max(1e-3, float(np.abs(t0[n]).max())), n


def test_reported_loss_is_the_mean_over_labelled_positions_only(tiny_f32: Path, tmp_path: Path) -> None:
    """With B = 0 the LoRA session is the base model: the loss a step reports must equal the
    base's mean NLL over the labelled positions, computed independently from llama.cpp logits."""
    init = initial_lora(tiny_f32, ("attn_q", "ffn_down"), 4, 8.0, 0, tmp_path / "init.gguf", architecture="llama")
    window = _window(256, seed=2)
    with InferenceSession(tiny_f32, n_ctx=256, threads=THREADS) as inf:
        nll = inf.window_nll(window)
    # label the 56 hardest positions only, so their mean is far from the mean over all
    keep = set(np.argsort(nll)[-56:].tolist())
    labels = [t if j in keep else IGNORE_INDEX for j, t in enumerate(window[1:])]
    expected = float(nll[sorted(keep)].mean())
    everything = float(nll.mean())
    with TrainSession(tiny_f32, n_ctx=256, threads=THREADS, optimizer="adamw", lr=1e-3, lora=init) as s:
        got = s.step(window[:-1], labels)
    assert got == pytest.approx(expected, rel=2e-3), (got, expected, everything)
    assert abs(everything - expected) > 10 * abs(got - expected)  # the test can tell them apart


def test_a_packed_window_trains_each_item_as_it_is_served(tiny_f32: Path, tmp_path: Path) -> None:
    """Three items packed into one window with their own sequence ids: the loss a step reports
    (B = 0, so the base model's) is the mean NLL of each item's targets computed *alone*, from
    position 0, as the server sees a conversation. As one sequence, the later items would attend
    to the earlier ones and sit at later positions: a different loss.

    Before llama_opt_set_seq_ids (patches/llama-cpp-python-0.3.36-1-training.patch) a packed
    window was one sequence, so an answer saw, and could learn to copy, the answers before it."""
    init = initial_lora(tiny_f32, ("attn_q", "ffn_down"), 4, 8.0, 0, tmp_path / "init.gguf", architecture="llama")
    items = [_window(n, seed=10 + n) for n in (60, 90, 70)]  # each n + 1 tokens
    inputs: list[int] = []
    labels: list[int] = []
    seq_ids: list[int] = []
    expected_sum, n_targets = 0.0, 0
    with InferenceSession(tiny_f32, n_ctx=256, threads=THREADS) as inf:
        for k, item in enumerate(items):
            nll = inf.window_nll(item)  # position j predicts item[j + 1], from position 0
            targets = range(len(item) // 2, len(item) - 1)  # the second half is the "answer"
            expected_sum += float(nll[list(targets)].sum())
            n_targets += len(targets)
            inputs += item[:-1]
            labels += [item[j + 1] if j in targets else IGNORE_INDEX for j in range(len(item) - 1)]
            seq_ids += [k] * (len(item) - 1)
    pad = 256 - len(inputs)
    inputs += [0] * pad
    labels += [IGNORE_INDEX] * pad
    seq_ids += [len(items)] * pad
    expected = expected_sum / n_targets
    with TrainSession(tiny_f32, n_ctx=256, threads=THREADS, optimizer="sgd", lr=1e-9, lora=init) as s:  # ~no update
        packed = s.step(inputs, labels, seq_ids)
        as_one_sequence = s.step(inputs, labels)
    assert packed == pytest.approx(expected, rel=2e-3), (packed, expected, as_one_sequence)
    assert abs(as_one_sequence - expected) > 10 * abs(packed - expected), (packed, expected, as_one_sequence)


def test_an_unlikelihood_target_adds_minus_w_log_one_minus_p_to_the_loss(tiny_f32: Path, tmp_path: Path) -> None:
    """``[train] unlikelihood``: with B = 0 (the base model) the loss a step reports is the mean
    over labelled positions of the cross-entropy plus ``-w * log(1 - p(negative))`` for each
    negative, p computed independently from llama.cpp logits. Before
    patches/llama-cpp-python-0.3.36-2-unlikelihood.patch there was no ``llama_opt_set_negatives``
    and a negative label value was read as a (negative) cross-entropy weight."""
    init = initial_lora(tiny_f32, ("attn_q", "ffn_down"), 4, 8.0, 0, tmp_path / "init.gguf", architecture="llama")
    window = _window(256, seed=3)
    rng = np.random.default_rng(4)
    labelled = sorted(rng.choice(np.arange(10, 250), size=40, replace=False).tolist())
    labels = [t if j in labelled else IGNORE_INDEX for j, t in enumerate(window[1:])]
    negatives = [(p, int(t)) for p, t in zip(labelled[::2], rng.integers(10, 2048, size=20)) if t != window[p + 1]]
    w = 2000.0  # random-model probabilities are ~1/2048: a large weight makes the term visible
    with InferenceSession(tiny_f32, n_ctx=256, threads=THREADS) as inf:
        ce = float(inf.window_nll(window)[labelled].sum())
        ul = 0.0
        for p, t in negatives:
            probe = list(window)
            probe[p + 1] = t  # position p's logits do not depend on token p + 1
            ul += -w * float(np.log1p(-np.exp(-inf.window_nll(probe)[p])))
    with TrainSession(tiny_f32, n_ctx=256, threads=THREADS, optimizer="sgd", lr=1e-9, lora=init) as s:  # ~no update
        plain = s.step(window[:-1], labels)
        with_ul = s.step(window[:-1], labels, negatives=negatives, unlikelihood=w)
    assert plain == pytest.approx(ce / len(labelled), rel=2e-3)
    assert with_ul == pytest.approx((ce + ul) / len(labelled), rel=2e-3), (with_ul, plain, ul)
    assert with_ul - plain > 20 * abs(with_ul - (ce + ul) / len(labelled))  # the test can tell them apart


def test_unlikelihood_pushes_the_negative_token_down_where_it_is_marked(tiny_f32: Path, tmp_path: Path) -> None:
    """After token A the answer goes on with N or with M, at random. The same 30 AdamW steps from
    the same init, with and without N marked as a negative (weight 3) where the answer goes on
    with M: cross-entropy alone already makes N less likely there as it memorises the window;
    with the unlikelihood term N must end far less likely still, the answer still learnt."""
    init = initial_lora(tiny_f32, ("attn_q", "ffn_down"), 4, 8.0, 0, tmp_path / "init.gguf", architecture="llama")
    A, N, M = 100, 200, 300
    rng = np.random.default_rng(7)
    window = _window(128, seed=8)[:128]
    while len(window) < 257:
        window += [A, int(rng.choice([N, M]))]
    window = window[:257]
    labels = [t if j >= 127 else IGNORE_INDEX for j, t in enumerate(window[1:])]
    after_m = [j for j in range(127, 256) if window[j + 1] == M]
    negatives = [(j, N) for j in after_m]
    probe = [N if j in after_m else IGNORE_INDEX for j in range(256)]
    result = {}
    for w in (0.0, 3.0):
        with TrainSession(tiny_f32, n_ctx=256, threads=THREADS, optimizer="adamw", lr=1e-2, lora=init) as s:
            for _ in range(30):
                s.step(window[:-1], labels, negatives=negatives, unlikelihood=w)
            s.set_lr(1e-12)
            answer = s.step(window[:-1], labels)  # mean NLL of the answer, ~no update
            neg_nll = s.step(window[:-1], probe)  # mean -log p(N) where the answer goes on with M
            result[w] = (answer, neg_nll)
    (answer0, neg0), (answer3, neg3) = result[0.0], result[3.0]
    assert neg3 > neg0 + 1.0, result  # measured: 1.34 without, 3.15 with (p(N) 6x lower)
    assert answer3 < answer0 + 0.3, result


def _answer_loss(model: Path, adapter: Path | None, windows: list[tuple[list[int], list[int]]]) -> float:
    with InferenceSession(model, n_ctx=256, threads=THREADS, adapter=adapter) as inf:
        tot, n = 0.0, 0
        for x, y in windows:
            nll = inf.window_nll(x + [0])
            mask = np.asarray(y) >= 0
            # window_nll scores x[1:] + [0] given x: position j predicts y[j] only where labelled
            tgt = np.asarray(x[1:] + [0])
            assert (tgt[mask] == np.asarray(y)[mask]).all()
            tot += float(nll[mask].sum())
            n += int(mask.sum())
    return tot / n


def test_masked_training_learns_the_answers_faster_than_unmasked(tiny_q8: Path, tmp_path: Path) -> None:
    """Random-noise prompts, one fixed answer: training on the answer tokens only lowers the
    answer's loss more per step than training on every token (the prompts are unlearnable noise)."""
    rng = np.random.default_rng(3)
    answer = _window(40, seed=99)[:40]
    windows = []
    for _ in range(6):
        prompt = rng.integers(10, 2048, size=216).tolist()
        x = prompt + answer
        y = [IGNORE_INDEX] * 215 + answer + [IGNORE_INDEX]  # position j predicts x[j+1]
        windows.append((x, y))
    init = initial_lora(tiny_q8, ("attn_q", "attn_v", "ffn_up", "ffn_down"), 8, 16.0, 0, tmp_path / "init.gguf",
                        architecture="llama")  # fmt: skip
    losses = {}
    for mode in ("masked", "unmasked"):
        with TrainSession(tiny_q8, n_ctx=256, threads=THREADS, optimizer="adamw", lr=3e-3, lora=init) as s:
            for _ in range(2):
                for x, y in windows:
                    s.step(x, y if mode == "masked" else x[1:] + [x[0]])
            out = tmp_path / f"{mode}.gguf"
            from adapter_chat.registry import write_lora_gguf

            write_lora_gguf(out, architecture="llama", pairs=s.lora_pairs(), alpha=16.0)
        losses[mode] = _answer_loss(tiny_q8, out, windows)
    losses["base"] = _answer_loss(tiny_q8, None, windows)
    assert losses["masked"] < losses["unmasked"] < losses["base"] + 0.5, losses
    assert losses["masked"] < losses["base"] - 1.0, losses


def test_lora_is_trained_directly_on_the_quantized_base(tiny_q8: Path, tmp_path: Path) -> None:
    # lr 2e-2: at 5e-2 this toy run is at the edge of divergence (its loss stops falling after the
    # fifth epoch, 0.43x to 0.51x of the first epoch's depending on rounding); at 2e-2 it falls to 0.10x
    cfg = TrainConfig(base_model=tiny_q8, cache_dir=tmp_path / "cache", epochs=8, lr=2e-2, rank=8, alpha=16.0,
                      threads=THREADS, targets=("attn_q", "attn_v", "ffn_up", "ffn_down"), quantized_base=True)  # fmt: skip
    result = train(cfg, pirate_chats(range(10)))
    assert result.method == "lora" and result.adapter is not None and result.trained is None
    assert result.base_f32 is None and not list((tmp_path / "cache").glob("*.f32.gguf"))  # no FP32 copy
    assert result.packing["items"] == 10 and result.packing["items_cut"] == 0
    reader = gguf.GGUFReader(result.adapter)
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    a = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight.lora_a")
    assert a.tensor_type == gguf.GGMLQuantizationType.F32 and int(a.shape[1]) == 8  # rank 8
    assert float(reader.fields["adapter.lora.alpha"].contents()) == 16.0
    # the epochs' answer losses fall, and the adapter serves on the base with a lower loss there
    assert result.epoch_losses[-1] < 0.25 * result.epoch_losses[0], result.epoch_losses
    from trainer.evaluate import evaluate

    report = evaluate(tiny_q8, result.adapter, pirate_chats(range(10)), threads=THREADS)
    assert report.adapter.loss < report.base.loss - 1.0, report.to_dict()


def test_a_killed_lora_run_resumes_from_its_last_checkpoint(tiny_q8: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(base_model=tiny_q8, cache_dir=tmp_path / "cache", epochs=4, lr=5e-3, rank=4, alpha=8.0,
                      threads=THREADS, checkpoint_every=3, targets=("attn_q", "ffn_down"))  # fmt: skip
    stop = threading.Event()
    steps: list[int] = []

    first: list[float] = []

    def kill_after_seven(event: dict) -> None:
        steps.append(event["step"])
        first.append(event["loss"])
        if event["step"] == 7:
            stop.set()

    ckpt = tmp_path / "ckpt"
    chats = pirate_chats(range(8))
    with pytest.raises(TrainingInterrupted):
        train(cfg, chats, callbacks=[kill_after_seven], stop=stop, checkpoint_dir=ckpt)
    assert (ckpt / "checkpoint.gguf").exists()
    again: list[int] = []
    result = train(cfg, chats, callbacks=[lambda e: again.append(e["step"])], checkpoint_dir=ckpt)
    assert result.resumed_from_step == 6  # the last checkpoint before the kill
    assert again[0] == 7 and again[-1] == result.steps
    # the numbers cover the whole run, the checkpointed steps included
    assert result.first_loss == first[0] and result.tokens == result.steps * cfg.n_ctx
    assert len(result.epoch_losses) == cfg.epochs
    assert not (ckpt / "checkpoint.gguf").exists()  # a finished run leaves no checkpoint
    # another config does not resume from it
    stop2 = threading.Event()
    with pytest.raises(TrainingInterrupted):
        train(cfg, chats, callbacks=[lambda e: e["step"] == 4 and stop2.set()], stop=stop2, checkpoint_dir=ckpt)
    other = TrainConfig(**{**cfg.__dict__, "lr": 1e-3})
    assert train(other, chats, checkpoint_dir=ckpt).resumed_from_step == 0
