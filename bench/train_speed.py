"""Training speed of each trainer configuration, measured side by side in one process.

The same random window is trained a few steps per configuration (after one warm-up step) on the
default base: today's full finetune of the FP32 copy (all 30 blocks, 256-token windows, SGD, every
token a target), and the LoRA path (rank 16 on the seven block matrices, AdamW) over the FP32 copy
or the served Q4_1 file, on all blocks or only the last ones. A LoRA window is labelled like the
example's packed windows (58% of positions are answer tokens, the rest prompt and padding). Each
row says whether the step runs llamafile's sgemm (the trainer's default) or ggml's own kernels
(the server's), and whether it computes logits only at the labelled positions (the default) or
everywhere. Speed is window positions per second, labelled or not. Two forward-only rows follow:
one ``llama_decode`` of the window, logits everywhere, no backward, ggml's kernels. The
``frozen_cache`` rows: the step of the last blocks' model fed the lower blocks' output, and the
forward pass through the lower blocks that computes it (once per new item). The machine's
raw single-sequence decode rate is measured first, so the figures can be scaled to another machine.

    .venv/bin/python bench/train_speed.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_nightly import BASE, raw_decode_rate  # noqa: E402
from trainer.finetune import f32_base, initial_lora  # noqa: E402
from trainer.frozen import n_blocks, shift_lora, top_model  # noqa: E402
from trainer.llama_opt import DEFAULT_TARGETS, BlockOutputs, InferenceSession, TrainSession, llamafile_available  # noqa: E402,E501
from trainer.packing import IGNORE_INDEX  # noqa: E402

WORK = REPO / "bench" / ".work" / "train_speed"
ANSWER_SHARE = 42_488 / 73_728
"""Labelled share of the example's packed windows (answer tokens / window positions, session 5)."""


@dataclass(frozen=True)
class Config:
    label: str
    base: str  # "f32" | "q4_1"
    method: str  # "full" | "lora" | "forward"
    n_ctx: int
    top: int = 0  # LoRA on the last `top` blocks (0: all)
    llamafile: bool = True  # llamafile's sgemm in the training step
    answers_only: bool = True  # labels: the example's share of answer tokens (False: every token)
    labelled_outputs: bool = True  # logits only where there is a label
    frozen: bool = False  # [train] frozen_cache: the upper `top` blocks' model, fed the lower blocks' output


CONFIGS = [
    Config("full finetune, all 30 blocks, every token a target (today's path)", "f32", "full", 256,
           llamafile=False, answers_only=False, labelled_outputs=False),
    Config("full finetune, all 30 blocks, every token a target, sgemm", "f32", "full", 256, answers_only=False),
    Config("LoRA r16, all 30 blocks, FP32 base", "f32", "lora", 512),
    Config("LoRA r16, last 10 blocks, FP32 base, ggml kernels, logits everywhere", "f32", "lora", 512, 10,
           llamafile=False, labelled_outputs=False),
    Config("LoRA r16, last 10 blocks, FP32 base, sgemm, logits everywhere", "f32", "lora", 512, 10, labelled_outputs=False),
    Config("LoRA r16, last 10 blocks, FP32 base (the example's config)", "f32", "lora", 512, 10),
    Config("LoRA r16, last 10 blocks, FP32 base, lower 20 blocks' output cached (frozen_cache)", "f32", "lora", 512, 10,
           frozen=True),
    Config("lower 20 blocks only, forward, sgemm (what frozen_cache computes once per new item)", "f32", "lower", 512, 10),
    Config("LoRA r16, last 10 blocks, Q4_1 base", "q4_1", "lora", 512, 10),
    Config("forward only, logits at every position, FP32 base, ggml kernels (no backward)", "f32", "forward", 512),
    Config("forward only, logits at every position, Q4_1 base, ggml kernels (no backward)", "q4_1", "forward", 512),
]


def rate(step: Callable[[], object], steps: int, n_ctx: int) -> float:
    """Window positions per second of ``step`` over ``steps`` calls, after one warm-up call."""
    step()  # warm-up: graph allocation
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * n_ctx / (time.perf_counter() - t0)


def forward_only(model: Path, n_ctx: int, steps: int) -> float:
    window = np.random.default_rng(0).integers(100, 40000, size=n_ctx + 1).tolist()
    with InferenceSession(model, n_ctx=n_ctx, threads=2) as s:
        return rate(lambda: s.window_nll(window), steps, n_ctx)


def measure(model: Path, c: Config, steps: int) -> float:
    if c.method == "forward":
        return forward_only(model, c.n_ctx, steps)
    n_layer = n_blocks(model)
    window = np.random.default_rng(0).integers(100, 40000, size=c.n_ctx + 1).tolist()
    embd = None
    if c.method == "lower" or c.frozen:
        with BlockOutputs(model, block=n_layer - c.top - 1, n_ctx=c.n_ctx, threads=2) as lower:
            if c.method == "lower":
                return rate(lambda: lower(window[:-1]), steps, c.n_ctx)
            embd = lower(window[:-1])
    init = None
    if c.method == "lora":
        init = initial_lora(BASE, DEFAULT_TARGETS, 16, 32.0, 0, WORK / f"init-{c.top}.gguf", architecture="llama",
                            top_layers=c.top)  # fmt: skip
    inputs, labels = window[:-1], window[1:]
    if c.answers_only:  # items of 170 tokens, the first 42% of each a prompt
        prompt = round(170 * (1 - ANSWER_SHARE))
        labels = [t if j % 170 >= prompt else IGNORE_INDEX for j, t in enumerate(labels)]
    opt = "sgd" if c.method == "full" else "adamw"
    offset = 0
    if c.frozen:
        assert init is not None
        offset = n_layer - c.top
        model = top_model(model, offset, WORK / f"top{c.top}.gguf")
        init = shift_lora(init, WORK / f"init-{c.top}-top.gguf", -offset, architecture="llama")
    with TrainSession(model, n_ctx=c.n_ctx, threads=2, optimizer=opt, lr=1e-4, lora=init, llamafile=c.llamafile,
                      labelled_outputs=c.labelled_outputs, block_offset=offset) as s:  # fmt: skip
        return rate(lambda: s.step(inputs, labels, embd=embd), steps, c.n_ctx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", metavar="I",
                   help="only these rows (1-based, in the table's order); the first row is always measured: the ratios are to it")
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    f32, _ = f32_base(BASE, WORK)
    raw = raw_decode_rate()
    print(f"Command: `python bench/train_speed.py {' '.join(sys.argv[1:])}`\n")
    print(f"Raw single-sequence decode of the base, measured first: **{raw:.0f} tok/s**.\n")
    print("| configuration | window | window positions/s | vs today's path |")
    print("|---|---|---|---|")
    first = None
    if not llamafile_available():
        print("This wheel has no llamafile sgemm behind the run-time switch: the sgemm rows run ggml's kernels.\n")
    for i, c in enumerate(CONFIGS, 1):
        if args.rows and i != 1 and i not in args.rows:
            continue
        tps = measure(f32 if c.base == "f32" else BASE, c, args.steps)
        first = first or tps
        print(f"| {c.label} | {c.n_ctx} | {tps:.0f} | {tps / first:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
