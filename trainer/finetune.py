"""Training through llama.cpp's training API: a LoRA trained directly, or a full finetune.

Owns: the training run — its typed config (:class:`TrainConfig`), the initial LoRA (A random, B
zero, as PEFT does), the FP32 copy of the quantized base for the full finetune (dequantized
once with ``gguf`` and cached by the base file's sha256), tokenizing and packing the items
(:mod:`trainer.packing`), the step loop with learning-rate schedule, checkpoints and resume,
progress callbacks and cooperative stop, and the result (:class:`TrainedModel`).

``method = "lora"`` (the default): the A and B tensors of rank ``rank`` on ``targets`` are the
only parameters; the base (its F32 copy, or the served quantized file itself with
``quantized_base = true``) stays frozen, and the adapter is written straight from the trained
tensors. ``method = "full"``: the target matrices train in full on the F32 copy and
:mod:`trainer.extract` factorises ``W_trained - W_base`` afterwards (kept as a measured
alternative; it needs a second FP32 model and an SVD).

Loss: only assistant tokens (and their end-of-turn token) are targets; see :mod:`trainer.packing`.

Over the ~400-line guide on purpose: the training run as one loop (windows, steps, schedule,
checkpoints and resume, writing the adapter), which reads best in one piece.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import gguf
import numpy as np
from pydantic.dataclasses import dataclass as pydantic_dataclass

from adapter_chat.chat_template import ChatTemplate
from adapter_chat.gguf_info import sha256_file
from adapter_chat.registry import write_lora_gguf
from trainer.frozen import FrozenBlocks, shift_lora
from trainer.config import SECTION, Bool, Int, TrainSettings
from trainer.llama_opt import TrainSession
from trainer.packing import Example, Packing, Window, pack, repeat_negatives, tokenize_example

Callback = Callable[[dict[str, Any]], None]


class TrainingInterrupted(RuntimeError):
    """Training stopped early because ``stop`` was set; nothing was written."""

    def __init__(self, steps_done: int, total_steps: int) -> None:
        super().__init__(f"training interrupted after {steps_done}/{total_steps} steps")
        self.steps_done = steps_done
        self.total_steps = total_steps


@pydantic_dataclass(frozen=True, kw_only=True, config=SECTION)
class TrainConfig(TrainSettings):
    """Everything that decides a training run (saved with the adapter as hyperparameters): an
    adapter's ``[train]`` settings (``trainer.config.TrainSettings``, defined and checked there
    once) plus what the run reads and where it writes.

    ``n_ctx`` is the window length in tokens and must be a multiple of 256. ``schedule``
    "cosine" decays the learning rate from ``lr`` to ``lr_min`` over all steps.
    ``targets`` are the block matrices that train (``blk.N.<target>.weight``).
    """

    base_model: Path
    cache_dir: Path
    threads: Int = 2
    n_gpu_layers: Int = 0
    shuffle: Bool = True

    def __post_init__(self) -> None:
        problems = self.problems()
        if self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @classmethod
    def from_settings(cls, settings: TrainSettings, *, base_model: Path, cache_dir: Path, threads: int,
                      n_gpu_layers: int = 0) -> TrainConfig:
        """The run's config from an adapter's ``[train]``: every setting, taken by name."""
        return cls(base_model=base_model, cache_dir=cache_dir, threads=threads, n_gpu_layers=n_gpu_layers,
                   **{f.name: getattr(settings, f.name) for f in dataclasses.fields(TrainSettings)})  # fmt: skip

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for 0-based ``step`` of ``total_steps`` (linear warm-up first)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant" or total_steps - self.warmup_steps <= 1:
            return self.lr
        frac = (step - self.warmup_steps) / (total_steps - self.warmup_steps - 1)
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
    """What a training run produced and the numbers that describe it. LoRA runs: ``adapter``
    (the LoRA GGUF) and ``rank``/``alpha``; full runs: ``base_f32`` and the trained FP32 GGUF
    ``trained``, for :mod:`trainer.extract`."""

    base_f32: Path | None
    trained: Path | None
    steps: int
    tokens: int
    tokens_per_s: float
    final_loss: float
    first_loss: float = float("nan")
    epoch_losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    base_sha256: str = ""
    method: str = "full"
    adapter: Path | None = None
    rank: int = 0
    alpha: float = 0.0
    packing: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("base_f32", "trained", "adapter"):
            d[k] = str(d[k]) if d[k] is not None else None
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


def _stream(convs: Sequence[Any], n_ctx: int) -> Packing:
    """``windows = "stream"``: every token of every item, concatenated, cut by :func:`make_windows`;
    every next token is a label, one sequence per window."""
    out = Packing(windows=[], n_ctx=n_ctx, items=len(convs))
    for w in make_windows([c.ids for c in convs], n_ctx):
        out.windows.append(Window(w[:-1], w[1:], [0] * n_ctx))
        out.per_window.append(n_ctx)
    out.labelled_tokens = out.positions = n_ctx * len(out.windows)
    starts, pos = set(), 0
    for c in convs:
        starts.add(pos)
        pos += len(c.ids)
    out.items_cut = sum(1 for b in range(n_ctx, pos, n_ctx) if b not in starts)  # boundaries inside an item
    return out


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


def initial_lora(base_model: Path, targets: Sequence[str], rank: int, alpha: float, seed: int, dest: Path,
                 *, architecture: str, top_layers: int = 0) -> Path:
    """Write the starting LoRA for ``base_model``: for every ``blk.N.<target>.weight``, A (rank,
    n_in) uniform in +-1/sqrt(n_in) (PEFT's Kaiming-uniform default) and B (n_out, rank) = 0, so
    the adapter starts as the identity and every gradient reaches B first. ``top_layers`` > 0
    adapts only the last that many blocks (backward then stops below them)."""
    reader = gguf.GGUFReader(base_model)
    rng = np.random.default_rng(seed)
    suffixes = tuple(f".{t}.weight" for t in targets)
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    n_layer = 1 + max(int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk."))
    first = n_layer - top_layers if 0 < top_layers < n_layer else 0
    for t in reader.tensors:
        if (t.name.startswith("blk.") and t.name.endswith(suffixes) and len(t.shape) == 2
                and int(t.name.split(".")[1]) >= first):
            n_in, n_out = int(t.shape[0]), int(t.shape[1])  # ggml ne order
            bound = 1.0 / math.sqrt(n_in)
            pairs[t.name] = (
                rng.uniform(-bound, bound, size=(rank, n_in)).astype(np.float32),
                np.zeros((n_out, rank), dtype=np.float32),
            )
    if not pairs:
        raise ValueError(f"no tensor of {base_model} matches targets {list(targets)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    write_lora_gguf(tmp, architecture=architecture, pairs=pairs, alpha=alpha)
    os.replace(tmp, dest)
    return dest


def _architecture(path: Path) -> str:
    return str(gguf.GGUFReader(path).fields["general.architecture"].contents())


@dataclass
class Checkpoint:
    """A LoRA run's last checkpoint: the adapter after ``step`` steps, and what must match to
    resume from it (``key``: config, data and base)."""

    dir: Path

    @property
    def adapter(self) -> Path:
        return self.dir / "checkpoint.gguf"

    @property
    def state(self) -> Path:
        return self.dir / "checkpoint.json"

    def load(self, key: str) -> tuple[int, str]:
        """(step to resume at, why not when 0); the saved run numbers are in ``self.numbers``."""
        self.numbers: dict[str, Any] = {}
        if not self.state.exists() or not self.adapter.exists():
            return 0, "no checkpoint"
        try:
            state = json.loads(self.state.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return 0, f"unreadable checkpoint state ({exc})"
        if state.get("key") != key:
            return 0, "the checkpoint is of another config, dataset or base"
        if sha256_file(self.adapter) != state.get("sha256"):
            return 0, "the checkpoint adapter does not match its recorded checksum"
        self.numbers = state.get("numbers") or {}
        return int(state.get("step", 0)), ""

    def save(self, sess: TrainSession, *, step: int, key: str, architecture: str, alpha: float,
             numbers: dict[str, Any]) -> None:  # fmt: skip
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".checkpoint.{os.getpid()}.tmp"
        write_lora_gguf(tmp, architecture=architecture, pairs=sess.lora_pairs(), alpha=alpha)
        os.replace(tmp, self.adapter)
        state_tmp = self.dir / f".checkpoint.{os.getpid()}.json.tmp"
        state_tmp.write_text(json.dumps({"key": key, "step": step, "sha256": sha256_file(self.adapter),
                                         "numbers": numbers}))  # fmt: skip
        os.replace(state_tmp, self.state)

    def clear(self) -> None:
        for p in (self.adapter, self.state):
            p.unlink(missing_ok=True)


def _run_key(cfg: TrainConfig, sha: str, packing: Packing, windows_sha: str) -> str:
    hp = cfg.hyperparameters()
    hp.pop("cache_dir", None)
    hp.pop("checkpoint_every", None)
    return hashlib.sha256(json.dumps([hp, sha, windows_sha, len(packing.windows)], sort_keys=True).encode()).hexdigest()


def train(
    cfg: TrainConfig,
    examples: Sequence[Example | str],
    *,
    template: ChatTemplate | None = None,
    callbacks: Sequence[Callback] = (),
    stop: threading.Event | None = None,
    out_path: Path | None = None,
    checkpoint_dir: Path | None = None,
    metadata: Mapping[str, str | int | float] | None = None,
    verbose: bool = False,
) -> TrainedModel:
    """Train on ``examples`` (dataset items: a conversation, or a plain ``text``).

    Conversations are tokenized with the one tokenization the server uses and packed
    (:mod:`trainer.packing`); only assistant turns are targets. Every step trains one window;
    after it, each callback gets ``{step, total_steps, loss, tokens_per_s, eta_s, lr, epoch}``
    (``loss``: mean over the window's target tokens). If ``stop`` is set, training ends before
    the next step and :class:`TrainingInterrupted` is raised (no output written; a LoRA run
    keeps its last checkpoint in ``checkpoint_dir`` and the next run with the same config and
    data resumes from it). Output: the LoRA GGUF (``method = "lora"``, default
    ``cache_dir/trained/<base sha256>.lora.gguf``) or the trained FP32 GGUF (``"full"``).
    """
    if not examples:
        raise ValueError("no training examples")
    if template is None:
        from trainer.dataset import load_template

        template = load_template(cfg.base_model)
    t0 = time.perf_counter()
    lora = cfg.method == "lora"
    sha = sha256_file(cfg.base_model)
    base_f32: Path | None = None
    if not lora or not cfg.quantized_base:
        base_f32, sha = f32_base(cfg.base_model, cfg.cache_dir, sha256=sha)
    model_path = cfg.base_model if lora and cfg.quantized_base else base_f32
    assert model_path is not None
    suffix = "lora.gguf" if lora else "gguf"
    out = Path(out_path) if out_path is not None else cfg.cache_dir / "trained" / f"{sha}.{suffix}"
    architecture = _architecture(cfg.base_model)
    ckpt = Checkpoint(Path(checkpoint_dir)) if (lora and checkpoint_dir is not None) else None
    init_key = hashlib.sha256(repr((cfg.targets, cfg.rank, cfg.alpha, cfg.seed, cfg.top_layers)).encode()).hexdigest()[:12]
    init = cfg.cache_dir / "trained" / f"{sha}.init-{init_key}.lora.gguf"
    if lora:
        initial_lora(cfg.base_model, cfg.targets, cfg.rank, cfg.alpha, cfg.seed, init, architecture=architecture,
                     top_layers=cfg.top_layers)  # fmt: skip

    # Tokenize and pack with the base's vocabulary (loaded alone: cheap, no weights).
    from trainer.llama_opt import VocabOnly

    with VocabOnly(cfg.base_model) as vocab:
        convs = [tokenize_example(vocab, template, ex) for ex in examples]
        pad_id = vocab.eos
        negatives = [repeat_negatives(c, vocab.piece) for c in convs] if cfg.unlikelihood > 0 else None
    if cfg.windows == "packed":
        packing = pack(convs, cfg.n_ctx, pad_id, negatives=negatives)
    else:
        packing = _stream(convs, cfg.n_ctx)
    if not packing.windows:
        raise ValueError("no training window: no example has an assistant token to learn")
    wh = hashlib.sha256()
    for w in packing.windows:
        wh.update(np.asarray(w.inputs + w.labels + w.seq_ids, dtype=np.int32).tobytes())
        wh.update(np.asarray(w.negatives, dtype=np.int32).tobytes())
    key = _run_key(cfg, sha, packing, wh.hexdigest())
    start_step, resume_note = (0, "")
    if ckpt is not None:
        start_step, resume_note = ckpt.load(key)
    start_from = ckpt.adapter if (ckpt is not None and start_step > 0) else init

    frozen: FrozenBlocks | None = None
    attach = start_from if lora else None
    if cfg.frozen_cache:
        assert base_f32 is not None
        frozen = FrozenBlocks(base_f32, base_sha256=sha, cache_dir=cfg.cache_dir, top_layers=cfg.top_layers,
                              n_ctx=cfg.n_ctx, threads=cfg.threads)  # fmt: skip
        frozen.prepare(packing.windows)
        model_path = frozen.top_model
        attach = shift_lora(start_from, cfg.cache_dir / "trained" / f".{sha}.{os.getpid()}.top.lora.gguf", -frozen.first,
                            architecture=architecture)  # fmt: skip

    rng = random.Random(cfg.seed)
    total = len(packing.windows) * cfg.epochs
    with TrainSession(
        model_path,
        n_ctx=cfg.n_ctx,
        threads=cfg.threads,
        n_gpu_layers=cfg.n_gpu_layers,
        optimizer=cfg.optimizer,
        targets=cfg.targets,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        lora=attach,
        verbose=verbose,
        block_offset=frozen.first if frozen is not None else 0,
    ) as sess:
        if frozen is not None and attach is not None:
            attach.unlink(missing_ok=True)  # loaded: llama.cpp holds its own copy
        step, tokens, first_loss, loss = 0, 0, float("nan"), float("nan")
        epoch_losses: list[float] = []
        t_train = time.perf_counter()
        trained_tokens = 0
        saved = ckpt.numbers if (ckpt is not None and start_step) else {}
        if saved:  # the numbers of the steps the checkpoint holds
            first_loss = float(saved.get("first_loss", first_loss))
            epoch_losses = [float(x) for x in saved.get("epoch_losses", [])]
        for epoch in range(cfg.epochs):
            order = list(range(len(packing.windows)))
            if cfg.shuffle:
                rng.shuffle(order)
            losses, weights = [], []
            if saved and len(epoch_losses) == epoch:  # this epoch was under way at the checkpoint
                losses, weights = list(saved.get("losses", [])), list(saved.get("weights", []))
            for i in order:
                if step < start_step:  # resuming: these steps are in the checkpoint
                    step += 1
                    tokens += cfg.n_ctx
                    continue
                if stop is not None and stop.is_set():
                    raise TrainingInterrupted(step, total)
                lr = cfg.lr_at(step, total)
                sess.set_lr(lr)
                w = packing.windows[i]
                embd = frozen.window(w) if frozen is not None else None
                loss = sess.step(w.inputs, w.labels, w.seq_ids, w.negatives, cfg.unlikelihood, embd=embd)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower lr (now {lr:g})")
                step += 1
                tokens += cfg.n_ctx
                trained_tokens += cfg.n_ctx
                losses.append(loss)
                weights.append(w.n_labelled)
                if math.isnan(first_loss):
                    first_loss = loss
                elapsed = time.perf_counter() - t_train
                tps = trained_tokens / elapsed if elapsed > 0 else 0.0
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
                if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    numbers = {"first_loss": first_loss, "epoch_losses": epoch_losses, "losses": losses,
                               "weights": weights}  # fmt: skip
                    ckpt.save(sess, step=step, key=key, architecture=architecture, alpha=cfg.alpha, numbers=numbers)
            if losses:
                epoch_losses.append(float(np.average(losses, weights=weights)))
        train_s = time.perf_counter() - t_train
        if stop is not None and stop.is_set():
            raise TrainingInterrupted(step, total)
        out.parent.mkdir(parents=True, exist_ok=True)
        if lora:
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            write_lora_gguf(tmp, architecture=architecture, pairs=sess.lora_pairs(), alpha=cfg.alpha,
                            metadata=metadata)  # fmt: skip
            os.replace(tmp, out)
        else:
            sess.save(out)
    if ckpt is not None:
        ckpt.clear()

    report = packing.report()
    if frozen is not None:
        report["frozen"] = frozen.stats.report()
    if resume_note and start_step == 0 and ckpt is not None and resume_note != "no checkpoint":
        report["resume_refused"] = resume_note
    return TrainedModel(
        base_f32=base_f32,
        trained=None if lora else out,
        steps=step,
        tokens=tokens,
        tokens_per_s=trained_tokens / train_s if train_s > 0 else 0.0,
        final_loss=loss,
        first_loss=first_loss,
        epoch_losses=epoch_losses,
        wall_s=time.perf_counter() - t0,
        base_sha256=sha,
        method=cfg.method,
        adapter=out if lora else None,
        rank=cfg.rank if lora else 0,
        alpha=cfg.alpha if lora else 0.0,
        packing=report,
        resumed_from_step=start_step,
    )


__all__ = [
    "Checkpoint",
    "initial_lora",
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
