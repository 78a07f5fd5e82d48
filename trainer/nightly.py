"""The nightly job: for each configured adapter, dataset -> train -> extract -> evaluate -> gate
-> publish, recorded in `trainer_runs`.

The stages themselves, and the typed results they hand each other, are in `trainer/stages.py`.
This module owns running them for every adapter and everything around them: the lock that keeps
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
import os
import signal
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from adapter_chat.db import Target
from trainer.config import AdapterConfig, TrainerConfig
from trainer.dataset import TokenCounter, expand_paths
from trainer.stages import (  # re-exported: the CLI and the tests name them from here
    Interrupted,
    Outcome,
    Progress,
    RunOptions,
    Say,
    Stages,
    _unflat_metrics,
    _write_json,
    run_stages,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130



class LockHeld(RuntimeError):
    """Another trainer run holds the lock file."""


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
        run_stages(Stages(cfg, adapter, outcome, stop, say, callbacks, options, run_dir, count_tokens, now))
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
