"""Full fine-tuning of the FP32 base through llama.cpp's training API, with progress callbacks.

Owns: the training run — its typed config (:class:`TrainConfig`), the FP32 copy of the
quantized base (dequantized once with ``gguf`` and cached by the base file's sha256),
turning rendered texts into token windows, the step loop with learning-rate schedule,
progress callbacks and cooperative stop, and the result (:class:`TrainedModel`).

The LoRA adapter is not trained directly: the target matrices are trained in full (plain SGD
keeps the update close to low rank) and :mod:`trainer.extract` factorises ``W_trained - W_base``.

Windows: all texts are tokenized (special tokens parsed, nothing added: the texts are already
rendered with the chat template) and concatenated in order into one stream, which is cut into
windows of ``n_ctx + 1`` tokens with stride ``n_ctx`` (the label of the last input token is the
first token of the next window). The last, short window is completed by wrapping around to the
start of the stream, so no padding token is ever a training target (llama.cpp's training labels
have no ignore index). A stream shorter than one window is repeated to fill it.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import gguf
import numpy as np

from server.gguf_info import sha256_file
from trainer.llama_opt import DEFAULT_TARGETS, OPTIMIZERS, TrainSession

Callback = Callable[[dict[str, Any]], None]
SCHEDULES = ("constant", "cosine")


class TrainingInterrupted(RuntimeError):
    """Training stopped early because ``stop`` was set; nothing was written."""

    def __init__(self, steps_done: int, total_steps: int) -> None:
        super().__init__(f"training interrupted after {steps_done}/{total_steps} steps")
        self.steps_done = steps_done
        self.total_steps = total_steps


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved with the adapter as hyperparameters).

    ``n_ctx`` is the window length in tokens and must be a multiple of 256. ``schedule``
    "cosine" decays the learning rate from ``lr`` to ``lr_min`` over all steps.
    ``targets`` are the block matrices that train (``blk.N.<target>.weight``).
    """

    base_model: Path
    cache_dir: Path
    n_ctx: int = 256
    epochs: int = 1
    lr: float = 2e-3
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    threads: int = 2
    seed: int = 0
    schedule: str = "constant"
    lr_min: float = 0.0
    shuffle: bool = True

    def __post_init__(self) -> None:
        self.base_model = Path(self.base_model)
        self.cache_dir = Path(self.cache_dir)
        self.targets = tuple(self.targets)
        problems = []
        if self.n_ctx <= 0 or self.n_ctx % 256:
            problems.append(f"n_ctx must be a positive multiple of 256 (llama.cpp pads to 256), got {self.n_ctx}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.targets:
            problems.append("targets must name at least one matrix, e.g. attn_q")
        if self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for 0-based ``step`` of ``total_steps``."""
        if self.schedule == "constant" or total_steps <= 1:
            return self.lr
        frac = step / (total_steps - 1)
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * frac))

    def hyperparameters(self) -> dict[str, Any]:
        """JSON-ready view (paths as strings) for manifests and adapter metadata."""
        d = asdict(self)
        d["base_model"] = str(self.base_model)
        d["cache_dir"] = str(self.cache_dir)
        d["targets"] = list(self.targets)
        return d


@dataclass
class TrainedModel:
    """What a training run produced: the FP32 base it started from, the trained FP32 GGUF,
    and the numbers that describe the run."""

    base_f32: Path
    trained: Path
    steps: int
    tokens: int
    tokens_per_s: float
    final_loss: float
    first_loss: float = float("nan")
    epoch_losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    base_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["base_f32"] = str(self.base_f32)
        d["trained"] = str(self.trained)
        return d


# ---------------------------------------------------------------------------------------------
# FP32 base


def dequantize_gguf(src: Path, dst: Path) -> Path:
    """Write ``dst``: ``src`` with every tensor converted to F32, all metadata kept
    (``general.file_type`` set to ALL_F32). Written to a temp file and renamed."""
    reader = gguf.GGUFReader(src)
    arch_field = reader.fields["general.architecture"]
    arch = arch_field.contents()
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        if f.name == "general.file_type":
            writer.add_uint32(f.name, int(gguf.LlamaFileType.ALL_F32))
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            arr = np.array(t.data, dtype=np.float32)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        writer.add_tensor(t.name, arr.reshape(shape))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def f32_base(base_model: Path, cache_dir: Path, *, sha256: str | None = None) -> tuple[Path, str]:
    """The FP32 copy of ``base_model`` in ``cache_dir`` (made on first use), and the base's sha256.
    The cache key is the sha256 of the base file, so a changed base never reuses a stale copy."""
    sha = sha256 or sha256_file(base_model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dst = cache_dir / f"{sha}.f32.gguf"
    if not dst.exists():
        dequantize_gguf(base_model, dst)
    return dst, sha


# ---------------------------------------------------------------------------------------------
# Windows


def make_windows(token_lists: Sequence[Sequence[int]], n_ctx: int) -> list[list[int]]:
    """Cut the concatenated token stream into windows of ``n_ctx + 1`` tokens, stride ``n_ctx``,
    wrapping around at the end (see module docstring). Empty input gives no windows."""
    stream = [t for toks in token_lists for t in toks]
    if len(stream) < 2:
        return []
    n_windows = max(1, math.ceil((len(stream) - 1) / n_ctx))
    need = n_windows * n_ctx + 1
    reps = math.ceil(need / len(stream))
    cyc = (stream * reps)[:need]
    return [cyc[i * n_ctx : i * n_ctx + n_ctx + 1] for i in range(n_windows)]


# ---------------------------------------------------------------------------------------------
# Callbacks


class ConsoleProgress:
    """Owns one console line: a progress bar with epoch, loss, tokens/s and ETA, redrawn per step."""

    def __init__(self, stream: IO[str] | None = None, *, width: int = 24) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width

    def __call__(self, event: dict[str, Any]) -> None:
        step, total = int(event["step"]), int(event["total_steps"])
        filled = int(self.width * step / max(1, total))
        eta = float(event.get("eta_s", 0.0))
        line = (
            f"\rtrain [{'#' * filled}{'.' * (self.width - filled)}] {step}/{total}"
            f" epoch {event['epoch']} loss {event['loss']:.4f} lr {event['lr']:.2e}"
            f" {event['tokens_per_s']:.0f} tok/s ETA {int(eta // 60)}:{int(eta % 60):02d}"
        )
        self.stream.write(line)
        if step >= total:
            self.stream.write("\n")
        self.stream.flush()


class JsonlWriter:
    """Owns a JSONL metrics file: one JSON object per step event, flushed as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def __call__(self, event: dict[str, Any]) -> None:
        self._f.write(json.dumps(event, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Training


def train(
    cfg: TrainConfig,
    texts: list[str],
    *,
    callbacks: Sequence[Callback] = (),
    stop: threading.Event | None = None,
    out_path: Path | None = None,
    verbose: bool = False,
) -> TrainedModel:
    """Fine-tune the target matrices of ``cfg.base_model`` (as FP32) on ``texts``.

    ``texts`` are already rendered with the chat template. Every step trains one window;
    after it, each callback gets ``{step, total_steps, loss, tokens_per_s, eta_s, lr, epoch}``.
    If ``stop`` is set, training ends before the next step and :class:`TrainingInterrupted`
    is raised (llama.cpp state is freed, no output written). The trained FP32 GGUF goes to
    ``out_path`` (default ``cache_dir/trained/<base sha256>.gguf``, overwritten per run).
    """
    if not texts:
        raise ValueError("no training texts")
    t0 = time.perf_counter()
    base_f32, sha = f32_base(cfg.base_model, cfg.cache_dir)
    out = Path(out_path) if out_path is not None else cfg.cache_dir / "trained" / f"{sha}.gguf"
    rng = random.Random(cfg.seed)

    with TrainSession(
        base_f32,
        n_ctx=cfg.n_ctx,
        threads=cfg.threads,
        optimizer=cfg.optimizer,
        targets=cfg.targets,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        verbose=verbose,
    ) as sess:
        windows = make_windows([sess.tokenize(t) for t in texts], cfg.n_ctx)
        if not windows:
            raise ValueError("texts tokenized to fewer than 2 tokens")
        total = len(windows) * cfg.epochs
        step, tokens, first_loss, loss = 0, 0, float("nan"), float("nan")
        epoch_losses: list[float] = []
        t_train = time.perf_counter()
        for epoch in range(cfg.epochs):
            order = list(range(len(windows)))
            if cfg.shuffle:
                rng.shuffle(order)
            losses = []
            for i in order:
                if stop is not None and stop.is_set():
                    raise TrainingInterrupted(step, total)
                lr = cfg.lr_at(step, total)
                sess.set_lr(lr)
                loss = sess.step(windows[i])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower lr (now {lr:g})")
                step += 1
                tokens += cfg.n_ctx
                losses.append(loss)
                if step == 1:
                    first_loss = loss
                elapsed = time.perf_counter() - t_train
                tps = tokens / elapsed if elapsed > 0 else 0.0
                event = {
                    "step": step,
                    "total_steps": total,
                    "loss": loss,
                    "tokens_per_s": tps,
                    "eta_s": (total - step) * cfg.n_ctx / tps if tps > 0 else 0.0,
                    "lr": lr,
                    "epoch": epoch + 1,
                }
                for cb in callbacks:
                    cb(event)
            epoch_losses.append(float(np.mean(losses)))
        train_s = time.perf_counter() - t_train
        if stop is not None and stop.is_set():
            raise TrainingInterrupted(step, total)
        sess.save(out)

    return TrainedModel(
        base_f32=base_f32,
        trained=out,
        steps=step,
        tokens=tokens,
        tokens_per_s=tokens / train_s if train_s > 0 else 0.0,
        final_loss=loss,
        first_loss=first_loss,
        epoch_losses=epoch_losses,
        wall_s=time.perf_counter() - t0,
        base_sha256=sha,
    )


__all__ = [
    "DEFAULT_TARGETS",
    "Callback",
    "ConsoleProgress",
    "JsonlWriter",
    "TrainConfig",
    "TrainedModel",
    "TrainingInterrupted",
    "dequantize_gguf",
    "f32_base",
    "make_windows",
    "train",
]
