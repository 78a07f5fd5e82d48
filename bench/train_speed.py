"""Training tokens/s of each trainer configuration, measured side by side in one process.

The same random window is trained a few steps per configuration (after one warm-up step) on the
default base: today's full finetune of the FP32 copy (all 30 blocks, 256-token windows, SGD), and
the LoRA path (rank 16 on the seven block matrices, AdamW) over the FP32 copy or the served Q4_1
file, on all blocks or only the last ones. The machine's raw single-sequence decode rate is
measured first, so the figures can be scaled to another machine.

    .venv/bin/python bench/train_speed.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_nightly import BASE, raw_decode_rate  # noqa: E402
from trainer.finetune import f32_base, initial_lora  # noqa: E402
from trainer.llama_opt import DEFAULT_TARGETS, TrainSession  # noqa: E402

WORK = REPO / "bench" / ".work" / "train_speed"
# (label, base: "f32" | "q4_1", method, n_ctx, top_layers)
CONFIGS = [
    ("full finetune, all 30 blocks (today's path)", "f32", "full", 256, 0),
    ("LoRA r16, all 30 blocks, FP32 base", "f32", "lora", 512, 0),
    ("LoRA r16, last 10 blocks, FP32 base (the example's config)", "f32", "lora", 512, 10),
    ("LoRA r16, last 10 blocks, Q4_1 base", "q4_1", "lora", 512, 10),
]


def measure(model: Path, method: str, n_ctx: int, top: int, steps: int) -> float:
    init = None
    if method == "lora":
        init = initial_lora(BASE, DEFAULT_TARGETS, 16, 32.0, 0, WORK / f"init-{top}.gguf", architecture="llama",
                            top_layers=top)  # fmt: skip
    window = np.random.default_rng(0).integers(100, 40000, size=n_ctx + 1).tolist()
    opt = "sgd" if method == "full" else "adamw"
    with TrainSession(model, n_ctx=n_ctx, threads=2, optimizer=opt, lr=1e-4, lora=init) as s:
        s.step(window)  # warm-up: graph allocation
        t0 = time.perf_counter()
        for _ in range(steps):
            s.step(window)
        return steps * n_ctx / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    f32, _ = f32_base(BASE, WORK)
    raw = raw_decode_rate()
    print(f"Command: `python bench/train_speed.py {' '.join(sys.argv[1:])}`\n")
    print(f"Raw single-sequence decode of the base, measured first: **{raw:.0f} tok/s**.\n")
    print("| configuration | window | training tokens/s | vs today's path |")
    print("|---|---|---|---|")
    first = None
    for label, base, method, n_ctx, top in CONFIGS:
        tps = measure(f32 if base == "f32" else BASE, method, n_ctx, top, args.steps)
        first = first or tps
        print(f"| {label} | {n_ctx} | {tps:.0f} | {tps / first:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
