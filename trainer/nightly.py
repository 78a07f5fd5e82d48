"""The nightly job: for each configured adapter, dataset -> train -> extract -> evaluate -> gate
-> publish, recorded in `trainer_runs`.

This module owns running the stages in order and everything around them: the lock that keeps
two runs from overlapping, the run record (start, end, status, metrics, reason) written through
`adapter_chat.store`, the run folder (`<cache_dir>/runs/<adapter>/<run id>/`: config, dataset report,
progress JSONL, evaluation, the adapter file), clean stops on Ctrl-C / SIGTERM, and the exit
codes a scheduler reads.

Statuses (`trainer_runs.status`): `published`, `rejected` (the gate said no; the current
version stays), `skipped` (too little or no new data), `failed`, `interrupted`.

Exit codes:

    0    every adapter published, rejected by the gate, or skipped
    1    at least one adapter failed
    2    usage or configuration error
    75   another run holds the lock (EX_TEMPFAIL: try again later)
    130  interrupted (SIGINT / SIGTERM); nothing was published by the interrupted stage
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from adapter_chat.db import Target
from trainer.config import AdapterConfig, TrainerConfig
from trainer.dataset import Dataset, TokenCounter, build_dataset, expand_paths

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130

Progress = Callable[[dict[str, Any]], None]
Say = Callable[[str], None]


class LockHeld(RuntimeError):
    """Another trainer run holds the lock file."""


class Interrupted(RuntimeError):
    """A stop was requested (signal or `stop` event) between or during stages."""


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` for the duration; LockHeld if another process has it.

    The lock dies with the process (no stale lock files after a crash); the file keeps the
    holder's pid for humans.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise LockHeld(f"{path}: another trainer run holds the lock (pid {holder}); try again later") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, say: Say) -> Iterator[None]:
    """SIGINT / SIGTERM set `stop` (the run winds down at the next step and publishes nothing);
    a second SIGINT raises KeyboardInterrupt at once. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        say(f"received {signal.Signals(signum).name}: stopping after the current step, publishing nothing")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Outcome:
    """How one adapter's run ended (mirrors its `trainer_runs` row)."""

    adapter: str
    status: str
    run_id: int | None = None
    version: int | None = None
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    output: Path | None = None


def exit_code(outcomes: Sequence[Outcome]) -> int:
    statuses = {o.status for o in outcomes}
    if "interrupted" in statuses:
        return EXIT_INTERRUPTED
    if "failed" in statuses:
        return EXIT_FAILURE
    return EXIT_OK


def runs_db(cfg: TrainerConfig) -> Target:
    """Where run records go: `runs_db`, else the first existing log (a PostgreSQL log counts),
    else the first log path without wildcards, else `<cache_dir>/trainer_runs.sqlite3`."""
    if cfg.runs_db is not None:
        return cfg.runs_db
    files, _ = expand_paths(cfg.logs)
    if files:
        return files[0]
    for pattern in cfg.logs:
        if not any(ch in pattern for ch in "*?["):
            return Path(pattern)
    return cfg.cache_dir / "trainer_runs.sqlite3"


def open_runs_db(cfg: TrainerConfig) -> Engine:
    from adapter_chat.store import open_db

    return open_db(runs_db(cfg))


def mark_stale_runs(conn: Engine, adapters: Sequence[str], adapters_dir: Path | None = None) -> int:
    """Rows of our adapters still `running` while we hold the lock were left by a killed process.

    A process killed after its publish made the new version current has really published: the
    version's manifest names the run (`trainer_run_id`), so the row becomes `published` with that
    version. Killed earlier, the row becomes `interrupted` (saying so when its version was written
    complete but never made current)."""
    from adapter_chat import registry
    from adapter_chat.store import finish_trainer_run

    if not adapters:
        return 0
    from adapter_chat.store import trainer_runs as t

    with conn.connect() as c:
        stale = c.execute(
            sa.select(t.c.id, t.c.adapter).where(t.c.status == "running", t.c.adapter.in_(list(adapters)))
        ).fetchall()
    for run_id, name in stale:
        mine = None
        if adapters_dir is not None:
            try:
                mine = next((m for m in registry.list_versions(adapters_dir, name, verify=False)
                             if m.trainer_run_id == run_id), None)
            except registry.RegistryError:
                mine = None
        if mine is not None and registry.current_version(adapters_dir, name) == mine.version:
            finish_trainer_run(conn, run_id, status="published", version=mine.version, metrics=_unflat_metrics(mine.metrics),
                               reason=f"the trainer process died after publishing v{mine.version} (found in the registry)")
        elif mine is not None:
            finish_trainer_run(conn, run_id, status="interrupted", reason=(
                f"the trainer process died while publishing: v{mine.version} was written complete but never "
                "made current"))
        else:
            finish_trainer_run(conn, run_id, status="interrupted",
                               reason="left running by a trainer process that died (killed or crashed)")
    return len(stale)


# ---------------------------------------------------------------------------------------------
# One adapter


@dataclass
class RunOptions:
    """How a single adapter run behaves beyond its config (the `train` command sets these)."""

    publish: bool = True
    """Publish to the registry when the gate passes."""
    output: Path | None = None
    """Also copy the adapter GGUF here (with a `.json` sidecar holding config and metrics)."""
    force: bool = False
    """Publish even when the gate refuses (the refusal is still recorded in the metrics)."""
    skip_unchanged: bool = True
    """Skip when the dataset is identical to the one the current version was trained on."""


def _check(stop: threading.Event, stage: str) -> None:
    if stop.is_set():
        raise Interrupted(f"stopped before {stage}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def stop_after_steps(stop: threading.Event, steps: int) -> Progress:
    """A progress callback that requests a stop after `steps` training steps (tests, demos)."""

    def cb(event: dict[str, Any]) -> None:
        if int(event.get("step", 0)) >= steps:
            stop.set()

    return cb


def run_adapter(
    cfg: TrainerConfig,
    adapter: AdapterConfig,
    conn: Engine,
    *,
    stop: threading.Event,
    say: Say,
    callbacks: Sequence[Progress] = (),
    options: RunOptions | None = None,
    count_tokens: TokenCounter | None = None,
    now: float | None = None,
) -> Outcome:
    """Run every stage for one adapter and record the run. Never raises for a run that fails:
    the failure is recorded and returned (KeyboardInterrupt is recorded, then re-raised)."""
    from adapter_chat.store import finish_trainer_run, start_trainer_run

    options = options or RunOptions()
    run_id = start_trainer_run(conn, adapter.name)
    run_dir = cfg.cache_dir / "runs" / adapter.name / f"{run_id:06d}"
    run_dir.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(adapter=adapter.name, status="failed", run_id=run_id, run_dir=run_dir)
    config_record = {**cfg.to_dict(), "adapters": [dataclasses.asdict(adapter)], "run": dataclasses.asdict(options)}
    _write_json(run_dir / "config.json", config_record)
    say(f"[{adapter.name}] run {run_id} started ({run_dir})")
    try:
        _run_stages(cfg, adapter, outcome, stop=stop, say=say, callbacks=callbacks, options=options,
                    count_tokens=count_tokens, now=now, run_dir=run_dir)  # fmt: skip
    except Interrupted as exc:
        outcome.status, outcome.reason = "interrupted", f"{exc}; nothing published"
    except KeyboardInterrupt:
        outcome.status, outcome.reason = "interrupted", "KeyboardInterrupt; nothing published"
        finish_trainer_run(conn, run_id, status=outcome.status, reason=outcome.reason, metrics=outcome.metrics)
        raise
    except Exception as exc:  # a failed run is a recorded outcome, not a crash of the whole job
        outcome.status = "failed"
        outcome.reason = f"{type(exc).__name__}: {exc}"[:2000]
        (run_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
    _write_json(run_dir / "outcome.json", dataclasses.asdict(outcome))
    finish_trainer_run(
        conn, run_id, status=outcome.status, version=outcome.version, reason=outcome.reason, metrics=outcome.metrics
    )
    say(f"[{adapter.name}] {outcome.status}" + (f" v{outcome.version}" if outcome.version else "")
        + (f": {outcome.reason}" if outcome.reason else ""))  # fmt: skip
    return outcome


def _run_stages(
    cfg: TrainerConfig,
    adapter: AdapterConfig,
    outcome: Outcome,
    *,
    stop: threading.Event,
    say: Say,
    callbacks: Sequence[Progress],
    options: RunOptions,
    count_tokens: TokenCounter | None,
    now: float | None,
    run_dir: Path,
) -> None:
    from adapter_chat import registry
    from adapter_chat.chat_template import ChatTemplate
    from adapter_chat.gguf_info import BaseModelInfo

    metrics = outcome.metrics
    # 1. dataset
    _check(stop, "the dataset")
    base = BaseModelInfo.load(cfg.base_model)

    data: Dataset = build_dataset(
        cfg, adapter, template=ChatTemplate.from_model(base), count_tokens=count_tokens, now=now
    )
    report = data.report
    _write_json(run_dir / "dataset.json", report.to_dict())
    metrics["dataset"] = {
        "train_items": report.train_items,
        "val_items": report.val_items,
        "tokens": report.tokens_total,
        "over_ctx": report.over_ctx,
        "dropped": sum(report.dropped.values()),
        "fingerprint": data.fingerprint,
    }
    say(f"[{adapter.name}] dataset: {report.train_items} train / {report.val_items} validation items, "
        f"{report.tokens_total} tokens, {report.over_ctx} over the {report.n_ctx}-token window, "
        f"{sum(report.dropped.values())} dropped")  # fmt: skip
    gate_cfg = adapter.gate
    if report.train_items < gate_cfg.min_items or report.val_items < gate_cfg.min_val_items:
        outcome.status = "skipped"
        outcome.reason = (
            f"too little data: {report.train_items} training items (need {gate_cfg.min_items}), "
            f"{report.val_items} validation items (need {gate_cfg.min_val_items})"
        )
        return
    current = registry.current_version(cfg.adapters_dir, adapter.name)
    current_manifest = None
    if current is not None:
        current_manifest = next(m for m in registry.list_versions(cfg.adapters_dir, adapter.name) if m.version == current)
        same_data = current_manifest.data_window.get("dataset_sha256") == data.fingerprint
        same_base = current_manifest.base_model_sha256 == base.sha256
        if options.skip_unchanged and same_data and same_base:
            outcome.status = "skipped"
            outcome.reason = f"no new data since version {current} (same dataset fingerprint)"
            return

    # 2. train
    _check(stop, "training")
    from trainer.finetune import JsonlWriter, TrainConfig, TrainingInterrupted, train

    t = adapter.train
    train_cfg = TrainConfig(
        base_model=cfg.base_model,
        cache_dir=cfg.cache_dir,
        n_ctx=t.n_ctx,
        epochs=t.epochs,
        lr=t.lr,
        optimizer=t.optimizer,
        weight_decay=t.weight_decay,
        targets=tuple(t.targets),
        threads=cfg.threads,
        n_gpu_layers=cfg.n_gpu_layers,
        seed=t.seed,
        schedule=t.schedule,
        lr_min=t.lr_min,
        method=t.method,
        rank=t.rank,
        alpha=t.alpha,
        quantized_base=t.quantized_base,
        top_layers=t.top_layers,
        checkpoint_every=t.checkpoint_every,
        warmup_steps=t.warmup_steps,
        windows=t.windows,
    )
    template = ChatTemplate.from_model(base)
    hyper = _hyperparameters(cfg, adapter)
    lora_meta = {
        "training.base_sha256": base.sha256,
        "training.dataset_sha256": data.fingerprint,
        "training.code_version": _code_version(),
        "training.hyperparameters": json.dumps(hyper, sort_keys=True),
    }
    lora_path = run_dir / "adapter.gguf"
    started = time.monotonic()
    try:
        with JsonlWriter(run_dir / "progress.jsonl") as progress_file:
            trained = train(
                train_cfg,
                data.train,
                template=template,
                callbacks=(*callbacks, progress_file),
                stop=stop,
                out_path=lora_path if t.method == "lora" else None,
                checkpoint_dir=cfg.cache_dir / "checkpoints" / adapter.name,
                metadata=lora_meta,
            )
    except TrainingInterrupted as exc:
        raise Interrupted(f"training stopped: {exc}") from exc
    metrics["train"] = {
        "method": trained.method,
        "steps": trained.steps,
        "tokens": trained.tokens,
        "tokens_per_s": trained.tokens_per_s,
        "first_loss": trained.first_loss,
        "final_loss": trained.final_loss,
        "epoch_losses": trained.epoch_losses,
        "seconds": round(time.monotonic() - started, 2),
        "packing": trained.packing,
        "resumed_from_step": trained.resumed_from_step,
    }
    resumed = f", resumed at step {trained.resumed_from_step}" if trained.resumed_from_step else ""
    say(f"[{adapter.name}] trained ({trained.method}): {trained.steps} steps, {trained.tokens} tokens, "
        f"{trained.tokens_per_s:.0f} tokens/s, loss on answers {trained.first_loss:.3f} -> {trained.final_loss:.3f}; "
        f"{trained.packing.get('items_cut', 0)} of {trained.packing.get('items', 0)} items cut by the "
        f"{t.n_ctx}-token window{resumed}")  # fmt: skip

    # 3. extract (full finetune only: the LoRA path wrote the adapter from its trained tensors)
    if t.method == "full":
        _check(stop, "extraction")
        from trainer.extract import extract_lora, save_lora

        e = adapter.extract
        started = time.monotonic()
        extraction = extract_lora(
            trained.base_f32,
            trained.trained,
            targets=tuple(t.targets),
            fidelity=e.fidelity,
            max_rank=e.max_rank,
            min_rank=e.min_rank,
            rank=e.rank,
        )
        save_lora(extraction, lora_path, architecture=base.architecture, metadata=lora_meta)
        metrics["extract"] = extraction.report() | {"seconds": round(time.monotonic() - started, 2)}
        say(f"[{adapter.name}] extracted LoRA rank {extraction.rank} keeping {extraction.mean_energy:.1%} of the energy")
        rank, alpha = int(extraction.rank), float(extraction.alpha)
    else:
        rank, alpha = trained.rank, trained.alpha

    # 4. evaluate and gate
    _check(stop, "evaluation")
    from trainer.evaluate import evaluate, gate

    started = time.monotonic()
    prompts = [list(i.messages[:-1]) for i in data.val if i.messages][: gate_cfg.sample_prompts]
    eval_report = evaluate(
        cfg.base_model,
        lora_path,
        data.val,
        trained=trained.trained,
        prompts=prompts,
        n_ctx=t.n_ctx,
        threads=cfg.threads,
        n_gpu_layers=cfg.n_gpu_layers,
        max_tokens=gate_cfg.max_tokens,
    )
    metrics["eval"] = eval_report.to_dict()
    task = None
    if gate_cfg.scorer:
        _check(stop, "task evaluation")
        from trainer.task_eval import read_prompts, score_task

        if gate_cfg.score_file is not None:
            held_out = read_prompts(gate_cfg.score_file)[: gate_cfg.score_prompts]
        else:
            held_out = [list(i.messages[:-1]) for i in data.val if i.messages][: gate_cfg.score_prompts]
        task = score_task(cfg.base_model, lora_path, held_out, scorer=gate_cfg.scorer, template=template,
                          max_tokens=gate_cfg.score_max_tokens, threads=cfg.threads,
                          n_gpu_layers=cfg.n_gpu_layers)  # fmt: skip
        metrics["eval"]["task"] = task.to_dict()
        say(f"[{adapter.name}] task score ({gate_cfg.scorer.rsplit('/', 1)[-1]}): adapter {task.adapter:.0%}, "
            f"base {task.base:.0%} on {task.prompts} held-out prompts")  # fmt: skip
    metrics["eval"]["seconds"] = round(time.monotonic() - started, 2)
    _write_json(run_dir / "eval.json", metrics["eval"])
    passed, why = gate(eval_report, margin=gate_cfg.margin, mode=gate_cfg.mode, task=task, min_score=gate_cfg.min_score)
    metrics["gate"] = {"passed": passed, "reason": why, "margin": gate_cfg.margin, "mode": gate_cfg.mode,
                       "min_score": gate_cfg.min_score}  # fmt: skip
    say(f"[{adapter.name}] gate {'passed' if passed else 'refused'}: {why}")

    if options.output is not None:
        _check(stop, "writing the output")
        _copy_with_sidecar(lora_path, options.output, {"config": hyper, "metrics": metrics})
        outcome.output = options.output

    # 5. publish
    _check(stop, "publishing")
    if not options.publish:
        where = f"written to {options.output}" if options.output is not None else f"kept in {run_dir}"
        outcome.status = "skipped" if passed else "rejected"
        outcome.reason = f"not published (--no-publish), {where}; gate: {why}"
        return
    if not passed and not options.force:
        keep = f"version {current} stays current" if current is not None else "no version published"
        outcome.status, outcome.reason = "rejected", f"{why}; {keep}"
        return
    manifest = registry.publish_version(
        cfg.adapters_dir,
        adapter.name,
        lora_path,
        base_model_sha256=base.sha256,
        base_model_name=base.name,
        architecture=base.architecture,
        rank=rank,
        alpha=alpha,
        metrics=_flat_metrics(metrics),
        data_window={
            "since": report.since,
            "until": report.until,
            "items": report.train_items + report.val_items,
            "train_items": report.train_items,
            "val_items": report.val_items,
            "dataset_sha256": data.fingerprint,
        },
        hyperparameters=hyper,
        targets=list(t.targets),
        keep=adapter.keep,
        trainer_run_id=outcome.run_id,
    )
    outcome.status, outcome.version = "published", manifest.version
    outcome.reason = why if passed else f"published with --force although the gate refused: {why}"


def _hyperparameters(cfg: TrainerConfig, adapter: AdapterConfig) -> dict[str, Any]:
    """The resolved config for this adapter, as saved in the manifest and the GGUF."""
    full = cfg.to_dict()
    return {
        "base_model": full["base_model"],
        "threads": cfg.threads,
        "train": full_adapter(adapter)["train"],
        "extract": full_adapter(adapter)["extract"],
        "gate": full_adapter(adapter)["gate"],
        "source": full_adapter(adapter)["source"],
        "keep": adapter.keep,
    }


def full_adapter(adapter: AdapterConfig) -> dict[str, Any]:
    from trainer.config import _jsonable

    return _jsonable(dataclasses.asdict(adapter))


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest's metrics: the evaluation numbers at the top, the rest nested."""
    out: dict[str, Any] = {}
    ev = metrics.get("eval") or {}
    for k, v in ev.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    task = ev.get("task")
    if isinstance(task, dict):  # the task score sits beside the validation loss
        out["task_score"] = task.get("adapter")
        out["task_score_base"] = task.get("base")
        out["task_prompts"] = task.get("prompts")
        out["task_scorer"] = task.get("scorer")
    out.update({k: v for k, v in metrics.items() if k != "eval"})
    return out


def _unflat_metrics(flat: dict[str, Any]) -> dict[str, Any]:
    """A run row's metrics back from a manifest's (`_flat_metrics`): the top-level numbers are the
    evaluation's."""
    scalar = {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {**{k: v for k, v in flat.items() if k not in scalar}, "eval": scalar}


def _copy_with_sidecar(src: Path, dest: Path, sidecar: dict[str, Any]) -> None:
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    _write_json(dest.with_suffix(".json"), sidecar)


def _code_version() -> str:
    try:
        from importlib.metadata import version

        return version("adapter-chat")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The whole job


def run_nightly(
    cfg: TrainerConfig,
    *,
    only: Sequence[str] = (),
    stop: threading.Event | None = None,
    say: Say = print,
    callbacks: Sequence[Progress] = (),
    options: RunOptions | None = None,
    count_tokens: TokenCounter | None = None,
    now: float | None = None,
) -> list[Outcome]:
    """Every configured adapter (or those in `only`), one after another, under the lock.

    Raises LockHeld when another run is active. A stop request ends the current adapter as
    `interrupted` and skips the rest (they get no row: they never started).
    """
    stop = stop or threading.Event()
    adapters = [cfg.adapter(n) for n in only] if only else list(cfg.adapters)
    outcomes: list[Outcome] = []
    with run_lock(cfg.lock_path):
        conn = open_runs_db(cfg)
        try:
            stale = mark_stale_runs(conn, [a.name for a in cfg.adapters], cfg.adapters_dir)
            if stale:
                say(f"closed {stale} run(s) left 'running' by a dead trainer process")
            for adapter in adapters:
                if stop.is_set():
                    break
                outcomes.append(
                    run_adapter(cfg, adapter, conn, stop=stop, say=say, callbacks=callbacks, options=options,
                                count_tokens=count_tokens, now=now)  # fmt: skip
                )
        finally:
            conn.dispose()
    return outcomes
