"""The trainer's command line: `python -m trainer COMMAND`.

Commands:

    dataset   build and measure a dataset (optionally write train/valid JSONL)
    nightly   dataset -> train (LoRA; or full + extract) -> evaluate -> gate -> publish, for every adapter
    train     the same pipeline once, for one adapter (from the config or from flags)
    rollback  make the previous version of an adapter current
    runs      list recent trainer runs

Configuration: `--config trainer.toml` (see docs/trainer.md); flags override the file, the file
overrides the defaults. Exit codes: 0 ok (including gate refused / skipped), 1 failure,
2 usage or configuration error, 75 lock held (try later), 130 interrupted.

Over the ~400-line guide on purpose: the CLI, one small function per subcommand and its parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from trainer.config import OPTIMIZERS, AdapterConfig, ConfigError, TrainerConfig, load_config, with_overrides
from trainer.nightly import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    LockHeld,
    Outcome,
    RunOptions,
    exit_code,
    runs_db,
    stop_on_signals,
)


class UsageError(ValueError):
    """A command-line problem (exit code 2)."""


def _err(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def _say(message: str) -> None:
    _err(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")


def parse_time(value: str) -> float:
    """Unix seconds, or an ISO date / date-time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {value!r} (use unix seconds or ISO 8601)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


# ---------------------------------------------------------------------------------------------
# Arguments


def _target(value: str) -> str | Path:
    """A database on the command line: a PostgreSQL URL as is, anything else a SQLite path."""
    from adapter_chat import db

    return value if db.is_url(value) else Path(value)


def _common(p: argparse.ArgumentParser, *, overrides: bool = True) -> None:
    p.add_argument("--config", type=Path, help="trainer.toml (flags override it)")
    if not overrides:
        return
    g = p.add_argument_group("paths (override the config file)")
    g.add_argument("--base-model", type=Path, help="base GGUF model")
    g.add_argument("--db", action="append", dest="logs", metavar="PATH_OR_GLOB",
                   help="conversation log: SQLite file or glob, or postgresql:// URL (repeatable; replaces the "
                        "config's list)")  # fmt: skip
    g.add_argument("--runs-db", type=_target, help="SQLite file or postgresql:// URL that receives trainer_runs rows")
    g.add_argument("--adapters-dir", type=Path)
    g.add_argument("--cache-dir", type=Path)
    g.add_argument("--threads", type=int)
    g.add_argument("--n-gpu-layers", type=int, help="model layers offloaded to a GPU (needs a GPU build)")
    g.add_argument("--snapshot", action="store_true", default=None,
                   help="read logs from a VACUUM INTO snapshot instead of a read-only connection")  # fmt: skip

    s = p.add_argument_group("data (override every selected adapter's source)")
    s.add_argument("--adapter", action="append", dest="adapters", metavar="NAME",
                   help="configured adapter to use (repeatable for nightly)")  # fmt: skip
    s.add_argument("--name", help="adapter name for an ad hoc run without a config section")
    s.add_argument("--route", action="append", dest="routes", metavar="ROUTE")
    s.add_argument("--served-adapter", action="append", dest="adapter_names", metavar="NAME",
                   help="only exchanges served with this adapter")  # fmt: skip
    s.add_argument("--path-kind", action="append", dest="path_kinds", choices=("prompt", "finetuned", "base"))
    s.add_argument("--since", type=parse_time, help="unix seconds or ISO 8601")
    s.add_argument("--until", type=parse_time)
    s.add_argument("--window-days", type=float)
    s.add_argument("--min-rating", type=int, choices=(-1, 0, 1))
    s.add_argument("--jsonl", action="append", type=Path, metavar="FILE", help="JSONL file (repeatable; replaces the config's list)")
    s.add_argument("--no-logs", action="store_true", help="ignore the conversation log")
    s.add_argument("--no-system-prompt", action="store_true",
                   help="train without the logged system prompt (distil a prompt path)")  # fmt: skip

    h = p.add_argument_group("hyperparameters (override every selected adapter's)")
    h.add_argument("--n-ctx", type=int)
    h.add_argument("--epochs", type=int)
    h.add_argument("--lr", type=float)
    h.add_argument("--optimizer", choices=OPTIMIZERS)
    h.add_argument("--seed", type=int)
    h.add_argument("--val-fraction", type=float)
    h.add_argument("--max-items", type=int, help="newest training items kept")
    h.add_argument("--max-val-items", type=int, help="newest validation items kept")
    h.add_argument("--method", choices=("lora", "full"), help="train the LoRA directly, or full finetune + SVD")
    h.add_argument("--rank", type=int, help="LoRA rank (method full: fixed rank instead of --fidelity)")
    h.add_argument("--fidelity", type=float)
    h.add_argument("--max-rank", type=int)
    h.add_argument("--margin", type=float, help="gate margin")
    h.add_argument("--min-items", type=int, help="skip with fewer training items")
    h.add_argument("--keep", type=int, help="versions kept on disk")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Nightly LoRA trainer: conversation log -> dataset -> LoRA -> gate -> publish.",
        epilog="exit codes: 0 ok (incl. gate refused / skipped), 1 failure, 2 usage, 75 lock held, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dataset", help="build and measure a dataset")
    _common(p)
    p.add_argument("--out", type=Path, help="write train.jsonl, valid.jsonl, report.json and config.json here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("nightly", help="train, gate and publish every configured adapter")
    _common(p)
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto")

    p = sub.add_parser("train", help="one run for one adapter (publishes unless --no-publish)")
    _common(p)
    p.add_argument("--output", type=Path, help="also write the adapter GGUF here (+ .json sidecar)")
    p.add_argument("--no-publish", action="store_true", help="do not publish to the adapters directory")
    p.add_argument("--force", action="store_true", help="publish even if the gate refuses")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto")

    p = sub.add_parser("rollback", help="make the previous version of NAME current")
    p.add_argument("name")
    _common(p, overrides=False)
    p.add_argument("--adapters-dir", type=Path)

    p = sub.add_parser("import", help="publish a LoRA GGUF made elsewhere (e.g. convert_lora_to_gguf.py) as NAME")
    p.add_argument("name")
    p.add_argument("file", type=Path, help="LoRA GGUF (general.type = adapter, *.lora_a / *.lora_b, F16 or F32)")
    _common(p, overrides=False)
    p.add_argument("--adapters-dir", type=Path)
    p.add_argument("--base-model", type=Path, help="the base GGUF it must fit (default: the config's)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the adapter's alpha (served strength)")
    p.add_argument("--note", help="kept in the manifest's hyperparameters")
    p.add_argument("--keep", type=int, default=5, help="versions kept on disk")

    p = sub.add_parser("runs", help="list recent trainer runs")
    _common(p, overrides=False)
    p.add_argument("--db", type=_target, dest="runs_db", help="SQLite file or postgresql:// URL holding trainer_runs")
    p.add_argument("--adapter", help="only this adapter")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    return parser


# ---------------------------------------------------------------------------------------------
# Config resolution: CLI > file > defaults


def resolve_config(args: argparse.Namespace, *, need_one: bool = False) -> tuple[TrainerConfig, list[str]]:
    """The config with flags applied, and the adapter names selected.

    With `need_one`, exactly one adapter is selected: `--adapter NAME`, else the only one
    configured, else an ad hoc one named `--name` (default `adhoc`) built from the flags.
    """
    cfg = load_config(args.config) if args.config else TrainerConfig()
    selected: list[str] = list(args.adapters or [])
    for name in selected:
        cfg.adapter(name)  # unknown names fail here, naming the file
    if need_one and len(selected) > 1:
        raise UsageError("give one --adapter for this command")
    if args.name:
        if selected:
            raise UsageError("give either --adapter (a configured adapter) or --name (an ad hoc one), not both")
        if not any(a.name == args.name for a in cfg.adapters):
            cfg = dataclasses.replace(cfg, adapters=(*cfg.adapters, AdapterConfig(name=args.name)))
        selected = [args.name]
    if need_one and not selected:
        if len(cfg.adapters) == 1:
            selected = [cfg.adapters[0].name]
        elif not cfg.adapters:
            cfg = dataclasses.replace(cfg, adapters=(AdapterConfig(name="adhoc"),))
            selected = ["adhoc"]
        else:
            names = ", ".join(a.name for a in cfg.adapters)
            raise UsageError(f"{args.config} configures several adapters ({names}); pick one with --adapter")
    # only the selected adapters get the per-adapter flags
    chosen = set(selected) if selected else {a.name for a in cfg.adapters}
    source: dict[str, Any] = {
        "routes": tuple(args.routes) if args.routes else None,
        "adapter_names": tuple(args.adapter_names) if args.adapter_names else None,
        "path_kinds": tuple(args.path_kinds) if args.path_kinds else None,
        "since": args.since,
        "until": args.until,
        "window_days": args.window_days,
        "min_rating": args.min_rating,
        "use_logs": False if args.no_logs else None,
        "include_system_prompt": False if args.no_system_prompt else None,
    }
    sections = {
        "source": source,
        "train": {"n_ctx": args.n_ctx, "epochs": args.epochs, "lr": args.lr, "optimizer": args.optimizer,
                  "seed": args.seed, "val_fraction": args.val_fraction, "max_items": args.max_items,
                  "max_val_items": args.max_val_items, "method": args.method, "rank": args.rank},
        "extract": {"rank": args.rank, "fidelity": args.fidelity, "max_rank": args.max_rank},
        "gate": {"margin": args.margin, "min_items": args.min_items},
    }  # fmt: skip
    adapters = []
    for a in cfg.adapters:
        if a.name in chosen:
            for section, values in sections.items():
                values = {k: v for k, v in values.items() if v is not None}
                if values:
                    a = dataclasses.replace(a, **{section: dataclasses.replace(getattr(a, section), **values)})
            if args.jsonl:
                a = dataclasses.replace(a, source=dataclasses.replace(a.source, jsonl=tuple(args.jsonl)))
            if args.keep is not None:
                a = dataclasses.replace(a, keep=args.keep)
        adapters.append(a)
    cfg = dataclasses.replace(cfg, adapters=tuple(adapters))
    cfg = with_overrides(
        cfg,
        base_model=args.base_model,
        logs=tuple(args.logs) if args.logs else None,
        runs_db=args.runs_db,
        adapters_dir=args.adapters_dir,
        cache_dir=args.cache_dir,
        threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        snapshot=args.snapshot,
    )
    return cfg, selected


def _progress_callbacks(mode: str, prefix: str = "") -> list[Any]:
    if mode == "none":
        return []
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        from trainer.finetune import ConsoleProgress

        return [ConsoleProgress()]
    from trainer.progress import LineProgress

    return [LineProgress(prefix=prefix)]


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_dataset(args: argparse.Namespace) -> int:
    from trainer.dataset import build_dataset

    cfg, selected = resolve_config(args, need_one=True)
    adapter = cfg.adapter(selected[0])
    data = build_dataset(cfg, adapter)
    report = data.report
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, items in (("train.jsonl", data.train), ("valid.jsonl", data.val)):
            with open(args.out / name, "w", encoding="utf-8") as f:
                for item in items:
                    f.write(json.dumps({"text": item.text, "origin": item.origin}, ensure_ascii=False) + "\n")
        (args.out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        config = {**cfg.to_dict(), "adapters": [dataclasses.asdict(adapter)], "fingerprint": data.fingerprint}
        (args.out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps({**report.to_dict(), "fingerprint": data.fingerprint}, indent=2))
    else:
        print(f"dataset for adapter {adapter.name!r}")
        print(report.format())
        if args.out:
            print(f"written: {args.out}/train.jsonl, valid.jsonl, report.json, config.json")
    return EXIT_OK


def _print_outcomes(outcomes: Sequence[Outcome]) -> None:
    for o in outcomes:
        version = f" v{o.version}" if o.version is not None else ""
        print(f"{o.adapter}: {o.status}{version}" + (f" - {o.reason}" if o.reason else ""))


def cmd_nightly(args: argparse.Namespace, *, one_off: bool = False) -> int:
    from trainer.nightly import run_nightly

    cfg, selected = resolve_config(args, need_one=one_off)
    if not cfg.adapters:
        raise UsageError(f"{args.config or 'the configuration'} configures no [adapters.NAME] section")
    options = None
    if one_off:
        options = RunOptions(
            publish=not args.no_publish, output=args.output, force=args.force, skip_unchanged=False
        )
    stop = threading.Event()
    with stop_on_signals(stop, _say):
        outcomes = run_nightly(
            cfg,
            only=selected,
            stop=stop,
            say=_say,
            callbacks=_progress_callbacks(args.progress),
            options=options,
        )
    _print_outcomes(outcomes)
    if stop.is_set():
        return EXIT_INTERRUPTED
    return exit_code(outcomes)


def cmd_rollback(args: argparse.Namespace) -> int:
    from adapter_chat.publish import rollback
    from adapter_chat.registry import InvalidAdapterName, RegistryError, current_version

    adapters_dir = args.adapters_dir
    if adapters_dir is None:
        adapters_dir = load_config(args.config).adapters_dir if args.config else TrainerConfig().adapters_dir
    try:
        before = current_version(adapters_dir, args.name)
        now = rollback(adapters_dir, args.name)
    except InvalidAdapterName as exc:
        raise UsageError(str(exc)) from exc
    except RegistryError as exc:
        _err(f"rollback {args.name}: {exc} (in {adapters_dir})")
        return EXIT_FAILURE
    print(f"{args.name}: current version {before} -> {now}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from adapter_chat.gguf_info import BaseModelInfo
    from adapter_chat.publish import import_lora
    from adapter_chat.registry import AdapterInvalid, InvalidAdapterName, RegistryError

    cfg = load_config(args.config) if args.config else TrainerConfig()
    adapters_dir = args.adapters_dir or cfg.adapters_dir
    base_path = args.base_model or cfg.base_model
    if not Path(base_path).is_file():
        raise UsageError(f"base model {base_path} not found: pass --base-model PATH")
    try:
        manifest = import_lora(adapters_dir, args.name, args.file, BaseModelInfo.load(base_path),
                               scale=args.scale, note=args.note, keep=args.keep)  # fmt: skip
    except InvalidAdapterName as exc:
        raise UsageError(str(exc)) from exc
    except AdapterInvalid as exc:
        _err(f"import {args.name}: {args.file} refused: {exc}")
        return EXIT_FAILURE
    except (RegistryError, OSError) as exc:
        _err(f"import {args.name}: {exc} (in {adapters_dir})")
        return EXIT_FAILURE
    print(f"{manifest.name}: published version {manifest.version} from {args.file} "
          f"(rank {manifest.rank}, alpha {manifest.alpha:g}, targets {', '.join(manifest.targets)})")  # fmt: skip
    return EXIT_OK


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_runs(args: argparse.Namespace) -> int:
    from adapter_chat import db
    from adapter_chat.store import read_trainer_runs

    target = args.runs_db
    if target is None:
        cfg = load_config(args.config) if args.config else TrainerConfig()
        target = runs_db(cfg)
    if not db.exists(target):
        print(f"no runs recorded yet ({target} does not exist)")
        return EXIT_OK
    try:
        rows = read_trainer_runs(target, limit=args.limit, adapter=args.adapter)
    except db.ERRORS as e:
        print(f"cannot read the runs from {db.describe(target)}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    path = db.describe(target)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return EXIT_OK
    if not rows:
        print(f"no runs recorded yet in {path}")
        return EXIT_OK
    print(f"{'id':>5}  {'adapter':<20} {'started':<19}  {'took':>7}  {'status':<11} {'ver':>4}  reason")
    for r in rows:
        took = f"{r.finished_at - r.started_at:.0f}s" if r.finished_at else "-"
        version = str(r.version) if r.version is not None else "-"
        reason = (r.reason or "").replace("\n", " ")
        print(f"{r.id:>5}  {r.adapter:<20} {_fmt_time(r.started_at):<19}  {took:>7}  "
              f"{r.status:<11} {version:>4}  {reason[:100]}")  # fmt: skip
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    from trainer.dataset import DatasetError

    try:
        if args.command == "dataset":
            return cmd_dataset(args)
        if args.command == "nightly":
            return cmd_nightly(args)
        if args.command == "train":
            return cmd_nightly(args, one_off=True)
        if args.command == "rollback":
            return cmd_rollback(args)
        if args.command == "import":
            return cmd_import(args)
        if args.command == "runs":
            return cmd_runs(args)
        raise UsageError(f"unknown command {args.command!r}")
    except (ConfigError, UsageError) as exc:
        _err(f"python -m trainer {args.command}: {exc}")
        return EXIT_USAGE
    except DatasetError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except LockHeld as exc:
        _err(str(exc))
        return EXIT_TEMPFAIL
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
