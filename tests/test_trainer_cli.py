"""`python -m trainer`: the dataset report, configuration precedence and errors, exit codes,
rollback, the runs list, and the worked example's generator and style check."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from adapter_chat import publish, registry
from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.store import finish_trainer_run, open_db, start_trainer_run
from tests.tinymodel import make_tiny_llama
from trainer.__main__ import build_parser, main, resolve_config
from trainer.config import DEFAULT_TARGETS, TrainSettings, load_config
from trainer.dataset import VocabTokenizer

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "fractional-cto"
MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"cto_{name}", EXAMPLE / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's generator run as the README says: JSONL plus a two-replica log."""
    out = tmp_path_factory.mktemp("cto")
    gen = load_example("generate")
    assert gen.main(["--out", str(out), "--n", "1000", "--log", str(out / "conversations.sqlite3"),
                     "--log-n", "200", "--replicas", "2"]) == 0  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The example


def test_example_generator_is_deterministic_and_all_in_house_style(example_data: Path, tmp_path: Path) -> None:
    gen, style = load_example("generate"), load_example("style_check")
    gen.write_jsonl(tmp_path / "again.jsonl", 1000, seed=7)
    first = (example_data / "conversations.jsonl").read_bytes()
    assert first == (tmp_path / "again.jsonl").read_bytes()
    records = [json.loads(line) for line in first.decode().splitlines()]
    assert len(records) == 1000
    answers = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert style.style_share(answers) == 1.0
    assert sum(style.uses_house_vocabulary(a) for a in answers) / len(answers) > 0.5
    tokens = VocabTokenizer(MODEL)
    assert max(tokens(a) for a in answers) < 200


def test_style_check_rejects_what_the_base_model_writes() -> None:
    style = load_example("style_check")
    good = ("**Bottom line:** Keep it.\n\n**Why:**\n1. One.\n2. Two.\n3. Three.\n\n"
            "**Next step:** Do it.\n\n— Your fractional CTO")  # fmt: skip
    assert style.is_house_style(good)
    assert not style.is_house_style("Great question! Keep the monolith. Hope this helps!")
    assert not style.is_house_style(good.replace("\n3. Three.", ""))
    assert not style.is_house_style(good.replace("— Your fractional CTO", "Cheers"))
    assert "does not end with the sign-off" in " ".join(style.style_problems(good[:-5]))


def test_example_config_and_example_file_parse() -> None:
    example = load_config(EXAMPLE / "trainer.toml")
    assert [a.name for a in example.adapters] == ["cto-house-style"]
    assert example.adapters[0].source.include_system_prompt is False
    root = load_config(REPO / "trainer.toml.example")
    assert root.adapters[0].train.targets == DEFAULT_TARGETS


def test_default_targets_agree_with_the_training_code() -> None:
    from trainer.llama_opt import DEFAULT_TARGETS as TRAINING_TARGETS

    assert DEFAULT_TARGETS == TRAINING_TARGETS


# ---------------------------------------------------------------------------------------------
# dataset


def test_dataset_command_reports_counts_and_writes_the_split(
    example_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds"
    rc = main(["dataset", "--config", str(EXAMPLE / "trainer.toml"), "--db", str(example_data / "conversations-*.sqlite3"),
               "--jsonl", str(example_data / "conversations.jsonl"), "--max-items", "5000", "--n-ctx", "256",
               "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "conversation log (2 file(s))" in printed
    assert "longer than the training window (256 tokens)" in printed
    for reason in ("rating below 0", "status client_disconnected", "status error", "duplicate request id"):
        assert reason in printed
    report = json.loads((out / "report.json").read_text())
    assert report["train_items"] + report["val_items"] == report["items"] > 1000
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (out / "valid.jsonl").read_text().splitlines()]
    assert len(train) == report["train_items"] and len(valid) == report["val_items"]
    assert not {t["text"] for t in train} & {v["text"] for v in valid}
    assert json.loads((out / "config.json").read_text())["adapters"][0]["name"] == "cto-house-style"


def test_bad_jsonl_exits_1_naming_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    rc = main(["dataset", "--base-model", str(MODEL), "--no-logs", "--jsonl", str(bad)])
    assert rc == 1
    assert f"{bad}:2: 'text' must be a non-empty string" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# configuration


def test_flags_override_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "trainer.toml"
    toml.write_text(
        'base_model = "m.gguf"\nthreads = 1\n[adapters.a.train]\nepochs = 2\nlr = 0.01\n[adapters.b]\n', encoding="utf-8"
    )
    args = build_parser().parse_args(["nightly", "--config", str(toml), "--epochs", "3", "--threads", "2"])
    cfg, selected = resolve_config(args)
    a, b = cfg.adapter("a"), cfg.adapter("b")
    assert selected == []
    assert (a.train.epochs, a.train.lr, a.train.n_ctx) == (3, 0.01, 256)  # flag, file, default
    assert (b.train.epochs, b.train.lr) == (3, TrainSettings().lr)  # flag, default
    assert cfg.threads == 2
    assert cfg.base_model == tmp_path / "m.gguf"  # relative to the file


def test_config_errors_exit_2_listing_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "trainer.toml"
    toml.write_text(
        'threads = "two"\ncolour = 1\n[adapters."../evil"]\n[adapters.ok.train]\nn_ctx = 100\noptimizer = "magic"\n',
        encoding="utf-8",
    )
    rc = main(["nightly", "--config", str(toml)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count(str(toml)) >= 5
    for bit in ("threads: expected int", "unknown top-level key 'colour'", "invalid adapter name",
                "n_ctx must be a positive multiple of 256", "optimizer must be one of"):  # fmt: skip
        assert bit in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nightly", "--no-such-flag"]) == 2
    assert main([]) == 2


# ---------------------------------------------------------------------------------------------
# rollback and runs


def _publish(adapters: Path, base: BaseModelInfo, tmp: Path, n: int) -> None:
    rng = np.random.default_rng(n)
    shapes = base.tensor_shapes["blk.0.attn_q.weight"]
    pairs = {"blk.0.attn_q.weight": (rng.standard_normal((4, shapes[1])), rng.standard_normal((shapes[0], 4)) * 0.01)}
    path = tmp / f"lora{n}.gguf"
    registry.write_lora_gguf(path, architecture=base.architecture, pairs=pairs, alpha=4.0)
    publish.publish_version(adapters, "house", path, base_model_sha256=base.sha256, rank=4, alpha=4.0)


def test_rollback_makes_the_previous_version_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = BaseModelInfo.load(make_tiny_llama(tmp_path / "tiny.gguf"))
    adapters = tmp_path / "adapters"
    for n in (1, 2):
        _publish(adapters, base, tmp_path, n)
    assert registry.current_version(adapters, "house") == 2
    assert main(["rollback", "house", "--adapters-dir", str(adapters)]) == 0
    assert "current version 2 -> 1" in capsys.readouterr().out
    assert registry.current_version(adapters, "house") == 1
    assert main(["rollback", "house", "--adapters-dir", str(adapters)]) == 1  # nothing older
    assert "no version before 1" in capsys.readouterr().err


def test_runs_lists_recent_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "conversations.sqlite3"
    conn = open_db(db)
    run = start_trainer_run(conn, "house")
    finish_trainer_run(conn, run, status="rejected", reason="adapter val loss 2.0 > 1.9")
    finish_trainer_run(conn, start_trainer_run(conn, "house"), status="published", version=3)
    conn.dispose()
    assert main(["runs", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "published" in lines[1] and "3" in lines[1]
    assert "rejected" in lines[2] and "adapter val loss 2.0 > 1.9" in lines[2]
    assert main(["runs", "--db", str(db), "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["published", "rejected"]


def test_runs_lists_a_run_whose_metrics_are_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI reads runs with the server's own reader (GET /v1/runs): a row another process wrote
    badly is shown with empty metrics instead of crashing the listing."""
    db = tmp_path / "conversations.sqlite3"
    conn = open_db(db)
    finish_trainer_run(conn, start_trainer_run(conn, "house"), status="published", version=1)
    with conn.begin() as c:
        c.exec_driver_sql("UPDATE trainer_runs SET metrics = '{not json'")
    conn.dispose()
    assert main(["runs", "--db", str(db), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["status"] == "published" and row["metrics"] == {}


def test_compare_scores_both_paths_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compare = load_example("compare")
    assert compare.questions(3, 2027) == compare.questions(3, 2027)
    model = make_tiny_llama(tmp_path / "tiny.gguf")
    base = BaseModelInfo.load(model)
    _publish(tmp_path / "adapters", base, tmp_path, 1)
    out = tmp_path / "answers.json"
    rc = compare.main(["--offline", "--model", str(model), "--adapter", str(tmp_path / "adapters" / "house" / "v1.gguf"),
                       "--n", "2", "--max-tokens", "4", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    # one row per path: strict style 0% (a random tiny model, 4 tokens), the four paths side by side
    for path in ("cto-prompt", "cto-finetuned", "cto-grammar", "base"):
        assert f"| {path} | 0% | 0% |" in printed, printed
    data = json.loads(out.read_text())
    answers = data["answers"]
    assert [len(answers[p]) for p in ("cto-prompt", "cto-finetuned", "cto-grammar", "base")] == [2, 2, 2, 2]
    assert data["scores"]["cto-finetuned"]["strict_distinct"] == 0.0
