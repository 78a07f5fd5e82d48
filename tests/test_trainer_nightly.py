"""The nightly job end to end on a tiny random llama: publish, skip, gate refusal, interruption
(stop event and a real SIGTERM), the lock, and the run records in the conversation log."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from adapter_chat import publish, registry
from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.store import open_db
from tests.conftest import log_rows
from tests.tinymodel import make_tiny_llama
from trainer.config import load_config
from trainer.nightly import (
    EXIT_INTERRUPTED,
    Outcome,
    RunOptions,
    exit_code,
    run_lock,
    run_nightly,
    stop_after_steps,
)

REPO = Path(__file__).resolve().parent.parent


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cto_generate", REPO / "examples" / "fractional-cto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


CONFIG = """
base_model = "tiny.gguf"
logs = ["conversations.sqlite3"]
adapters_dir = "adapters"
cache_dir = "cache"

[adapters.cto]
jsonl = ["cto.jsonl"]
train = {{ lr = 1e-2, val_fraction = 0.2 }}
gate = {{ min_items = 8, min_val_items = 2, sample_prompts = 1, max_tokens = 8 }}

[adapters.strict]
jsonl = ["small.jsonl"]
train = {{ lr = 1e-2, val_fraction = 0.3 }}
gate = {{ margin = {strict_margin}, min_items = 3, min_val_items = 1, sample_prompts = 0 }}

[adapters.starved]
jsonl = ["small.jsonl"]
gate = {{ min_items = 1000 }}

[adapters.scored]
jsonl = ["cto.jsonl"]
train = {{ lr = 1e-2, val_fraction = 0.2 }}
gate = {{ min_items = 8, min_val_items = 2, sample_prompts = 0, scorer = "scorer.py:{scorer}", min_score = 0.5, score_prompts = 3, score_max_tokens = 8 }}
"""

SCORER = """
def never(answer):
    return False


def answered(answer):
    return 1.0 if isinstance(answer, str) else 0.0
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nightly")
    make_tiny_llama(root / "tiny.gguf")
    gen = load_generator()
    gen.write_jsonl(root / "cto.jsonl", 16, seed=1)
    gen.write_jsonl(root / "small.jsonl", 8, seed=3)  # seed 3: 2 of 8 in validation
    (root / "trainer.toml").write_text(CONFIG.format(strict_margin=0.99, scorer="answered"), encoding="utf-8")
    (root / "scorer.py").write_text(SCORER, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def published(world: Path) -> Outcome:
    cfg = load_config(world / "trainer.toml")
    outcomes = run_nightly(cfg, only=["cto"], say=lambda m: None)
    assert len(outcomes) == 1
    return outcomes[0]


def runs(world: Path) -> list[dict]:
    cols = ("id", "adapter", "status", "version", "reason", "metrics", "finished_at")
    rows = [tuple(r[c] for c in cols) for r in log_rows(world / "conversations.sqlite3",
                                                         f"SELECT {', '.join(cols)} FROM trainer_runs ORDER BY id")]
    return [dict(zip(cols, r)) | {"metrics": json.loads(r[5] or "{}")} for r in rows]


def test_nightly_publishes_a_version_the_registry_serves(world: Path, published: Outcome) -> None:
    assert published.status == "published", published.reason
    assert published.version == 1
    adapters = world / "adapters"
    assert registry.current_version(adapters, "cto") == 1
    [manifest] = registry.list_versions(adapters, "cto")
    base = BaseModelInfo.load(world / "tiny.gguf")
    assert manifest.base_model_sha256 == base.sha256
    # the server's own validation accepts the file
    info = registry.validate_lora_file(adapters / "cto" / "v1.gguf", base)
    assert info.rank == manifest.rank
    # the config is saved with the output
    assert manifest.hyperparameters["train"]["lr"] == 0.01
    assert manifest.hyperparameters["gate"]["min_items"] == 8
    assert manifest.data_window["items"] == 16
    assert manifest.metrics["val_loss_adapter"] < manifest.metrics["val_loss_base"]
    # and the run is recorded where the server's /metrics reads it
    [row] = [r for r in runs(world) if r["adapter"] == "cto"]
    assert row["status"] == "published" and row["version"] == 1 and row["finished_at"]
    assert row["metrics"]["train"]["steps"] > 0
    assert (published.run_dir / "config.json").exists() and (published.run_dir / "progress.jsonl").exists()


def test_nightly_without_new_data_is_skipped(world: Path, published: Outcome) -> None:
    [again] = run_nightly(load_config(world / "trainer.toml"), only=["cto"], say=lambda m: None)
    assert again.status == "skipped"
    assert "no new data since version 1" in (again.reason or "")
    assert registry.current_version(world / "adapters", "cto") == 1
    assert len(registry.list_versions(world / "adapters", "cto")) == 1


def test_the_gate_scores_held_out_answers_with_the_adapters_scorer(world: Path) -> None:
    """A scorer named in the config judges greedy answers (through the server's engine) to
    held-out prompts; its share is in the manifest beside the validation loss, and a share
    under `min_score` refuses the version."""
    [out] = run_nightly(load_config(world / "trainer.toml"), only=["scored"], say=lambda m: None)
    assert out.status == "published", out.reason
    [manifest] = registry.list_versions(world / "adapters", "scored")
    m = manifest.metrics
    assert m["task_score"] == 1.0 and m["task_score_base"] == 1.0 and m["task_prompts"] == 3
    assert m["task_scorer"].endswith("scorer.py:answered") and "val_loss_adapter" in m
    assert "task score 100% >= 50% required" in (out.reason or "")

    (world / "never.toml").write_text(
        CONFIG.format(strict_margin=0.99, scorer="never"), encoding="utf-8"
    )
    [refused] = run_nightly(load_config(world / "never.toml"), only=["scored"], say=lambda m: None,
                            options=RunOptions(skip_unchanged=False))  # fmt: skip
    assert refused.status == "rejected" and "task score 0% < 50% required" in (refused.reason or "")
    assert registry.current_version(world / "adapters", "scored") == 1
    # the second night read the base's validation losses and answers from the base cache
    first, second = (json.loads((o.run_dir / "eval.json").read_text()) for o in (out, refused))
    assert second["base"]["cached"] == second["n_texts"] > 0  # (the first may share cto's items)
    assert (first["task"]["base_cached"], second["task"]["base_cached"]) == (0, 3)
    assert second["val_loss_base"] == first["val_loss_base"] == m["val_loss_base"]


def test_too_little_data_is_skipped_and_recorded(world: Path) -> None:
    [out] = run_nightly(load_config(world / "trainer.toml"), only=["starved"], say=lambda m: None)
    assert out.status == "skipped" and "too little data" in (out.reason or "")
    assert exit_code([out]) == 0
    assert runs(world)[-1]["status"] == "skipped"
    assert not (world / "adapters" / "starved").exists()


def _seed_strict(world: Path, published: Outcome) -> None:
    """Give `strict` a current version 1 (the same weights as cto v1: same base model)."""
    adapters = world / "adapters"
    if registry.current_version(adapters, "strict") is None:
        m = registry.list_versions(adapters, "cto")[0]
        publish.publish_version(adapters, "strict", adapters / "cto" / "v1.gguf", base_model_sha256=m.base_model_sha256,
                                 architecture=m.architecture, rank=m.rank, alpha=m.alpha)  # fmt: skip


def test_gate_refusal_keeps_the_current_version(world: Path, published: Outcome) -> None:
    _seed_strict(world, published)
    [out] = run_nightly(load_config(world / "trainer.toml"), only=["strict"], say=lambda m: None)
    assert out.status == "rejected", out.reason
    assert "version 1 stays current" in (out.reason or "")
    assert registry.current_version(world / "adapters", "strict") == 1
    assert [m.version for m in registry.list_versions(world / "adapters", "strict")] == [1]
    assert exit_code([out]) == 0  # a refusal is a normal night, not a failure
    row = runs(world)[-1]
    assert row["status"] == "rejected" and row["version"] is None
    assert row["metrics"]["gate"]["passed"] is False


def test_interrupted_run_publishes_nothing(world: Path, published: Outcome) -> None:
    _seed_strict(world, published)
    cfg = load_config(world / "trainer.toml")
    strict = cfg.adapter("strict")
    passing = dataclasses.replace(strict, gate=dataclasses.replace(strict.gate, margin=0.0))  # would publish
    cfg = dataclasses.replace(cfg, adapters=(passing,))
    stop = threading.Event()
    [out] = run_nightly(cfg, only=["strict"], stop=stop, callbacks=[stop_after_steps(stop, 1)], say=lambda m: None)
    assert out.status == "interrupted" and "nothing published" in (out.reason or "")
    assert exit_code([out]) == EXIT_INTERRUPTED
    assert registry.current_version(world / "adapters", "strict") == 1
    assert runs(world)[-1]["status"] == "interrupted"


def _cli(world: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args],
        cwd=world,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_stops_cleanly_with_exit_130(world: Path, published: Outcome) -> None:
    _seed_strict(world, published)
    proc = _cli(world, "nightly", "--config", "trainer.toml", "--adapter", "strict", "--margin", "0", "--progress", "lines")
    seen = []
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        seen.append(line)
        if "train step" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(seen)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + err
    assert "received SIGTERM" in err
    assert "strict: interrupted" in out
    assert registry.current_version(world / "adapters", "strict") == 1
    assert runs(world)[-1]["status"] == "interrupted"


def test_second_run_while_the_lock_is_held_exits_75(world: Path) -> None:
    cfg = load_config(world / "trainer.toml")
    before = len(runs(world)) if (world / "conversations.sqlite3").exists() else 0
    with run_lock(cfg.lock_path):
        proc = _cli(world, "nightly", "--config", "trainer.toml")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "holds the lock" in err and str(os.getpid()) in err
    assert (len(runs(world)) if before else 0) == before  # nothing ran, nothing recorded


def test_runs_left_running_by_a_killed_trainer_are_marked_interrupted(world: Path) -> None:
    from adapter_chat.store import start_trainer_run

    conn = open_db(world / "conversations.sqlite3")
    run_id = start_trainer_run(conn, "cto")
    conn.dispose()
    run_nightly(load_config(world / "trainer.toml"), only=["starved"], say=lambda m: None)
    row = next(r for r in runs(world) if r["id"] == run_id)
    assert row["status"] == "interrupted" and "died" in row["reason"]


def test_one_off_train_writes_the_adapter_without_publishing(
    world: Path, published: Outcome, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.__main__ import main

    _seed_strict(world, published)
    out = world / "one-off" / "strict.gguf"
    rc = main(["train", "--config", str(world / "trainer.toml"), "--adapter", "strict", "--margin", "0",
               "--no-publish", "--output", str(out), "--progress", "none"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "strict: skipped - not published (--no-publish), written to" in capsys.readouterr().out
    base = BaseModelInfo.load(world / "tiny.gguf")
    assert registry.validate_lora_file(out, base).rank >= 1
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["config"]["gate"]["margin"] == 0.0 and "eval" in sidecar["metrics"]
    assert registry.current_version(world / "adapters", "strict") == 1
