"""The dataset builder: JSONL shapes, bad-line errors, the log filters, the split, the report.

Real parts throughout: the base model's own chat template and vocabulary, and conversation logs
written by the server's own writer (`adapter_chat.store.ConversationLog`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from adapter_chat.chat_template import ChatTemplate
from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.store import ConversationLog
from trainer.config import AdapterConfig, SourceConfig, TrainerConfig, TrainSettings
from trainer.dataset import (
    DatasetError,
    Item,
    VocabTokenizer,
    build_dataset,
    measure,
    read_jsonl,
    read_log,
    split,
)

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.from_model(BaseModelInfo.load(MODEL, sha256="-"))


@pytest.fixture(scope="module")
def tokens() -> VocabTokenizer:
    return VocabTokenizer(MODEL)


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# JSONL


def test_completion_shape_is_trained_verbatim(tmp_path: Path, template: ChatTemplate) -> None:
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "Once upon a time."}, {"text": "The end."}])
    items, shape = read_jsonl(f, template)
    assert shape == "completion"
    assert [i.text for i in items] == ["Once upon a time.", "The end."]
    assert items[1].origin == f"{f}:2"


def test_pairs_shape_renders_with_the_models_chat_template(tmp_path: Path, template: ChatTemplate) -> None:
    f = write_jsonl(tmp_path / "p.jsonl", [{"input": "Hi?", "output": "Hello."}])
    items, shape = read_jsonl(f, template)
    assert shape == "pairs"
    expected = template.render(
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], add_generation_prompt=False
    )
    assert items[0].text == expected
    # exactly what the server would feed SmolLM2 (ChatML, its default system prompt included)
    assert items[0].text.endswith("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n")
    assert items[0].prompt is not None and items[0].prompt.endswith("<|im_start|>assistant\n")
    assert items[0].key == "Hi?"


def test_chat_shape_accepts_openai_content_parts(tmp_path: Path, template: ChatTemplate) -> None:
    f = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "conversation_id": "c-1",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
                    {"role": "assistant", "content": "Blue."},
                ],
            }
        ],
    )
    items, shape = read_jsonl(f, template)
    assert shape == "chat"
    assert items[0].text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.")
    assert items[0].answer == "Blue."
    assert items[0].key == "c-1"


def test_every_bad_line_is_reported_with_file_and_line(tmp_path: Path, template: ChatTemplate) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = tmp_path / "bad.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps(good),  # 1: fine, sets the shape
                "{not json",  # 2
                json.dumps({"text": "other shape"}),  # 3
                "",  # 4: blank lines are fine
                json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),  # 5
                json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DatasetError) as err:
        read_jsonl(f, template)
    message = str(err.value)
    assert len(err.value.problems) == 4
    for line in (2, 3, 5, 6):
        assert f"{f}:{line}:" in message
    assert "not valid JSON" in message
    assert "expected the chat shape" in message and "like line 1" in message
    assert "last message must be the assistant" in message
    assert "role must be one of" in message


def test_unknown_first_record_says_which_shapes_are_accepted(tmp_path: Path, template: ChatTemplate) -> None:
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DatasetError, match=r"x\.jsonl:1: cannot tell the shape.*\"messages\""):
        read_jsonl(f, template)


# ---------------------------------------------------------------------------------------------
# Report


def test_report_counts_items_longer_than_the_training_window(tokens: VocabTokenizer) -> None:
    short = [Item(text=f"A short item number {i}.", key=str(i), origin="t") for i in range(8)]
    long = [Item(text="word " * 400 + str(i), key=f"L{i}", origin="t") for i in range(3)]
    report = measure(short + long, tokens, n_ctx=256)
    lengths = [tokens(i.text) for i in long]
    assert all(n > 256 for n in lengths)
    assert report.items == 11
    assert report.over_ctx == 3
    assert report.tokens_past_ctx == sum(n - 256 for n in lengths)
    assert report.tokens_max == max(lengths)
    assert sum(report.histogram.values()) == 11
    assert "longer than the training window (256 tokens): 3 item(s)" in report.format()


# ---------------------------------------------------------------------------------------------
# The conversation log


def log_exchange(
    log: ConversationLog,
    rid: str,
    question: str,
    answer: str | None,
    *,
    route: str = "house",
    status: str = "completed",
    finish_reason: str | None = "stop",
    created_at: float | None = None,
    conversation_id: str | None = None,
    system_prompt: str | None = None,
) -> None:
    log.begin(
        {
            "id": rid,
            "created_at": created_at if created_at is not None else time.time() - 60,
            "model": route,
            "route": route,
            "path_kind": "prompt",
            "adapters": [],
            "system_prompt": system_prompt,
            "messages": [{"role": "user", "content": question}],
            "params": {},
            "conversation_id": conversation_id,
        }
    )
    log.finish(rid, {"status": status, "response": answer, "finish_reason": finish_reason})


def fill_log(target: Any) -> Any:
    """The same twelve exchanges and their feedback, logged through the server's writer."""
    log = ConversationLog(target)
    log_exchange(log, "r1", "Q1", "good answer 1")
    log_exchange(log, "r2", "Q2", "bad answer 2")
    log.add_feedback("r2", -1, None, "wrong")
    log_exchange(log, "r3", "Q3", "clumsy answer 3")
    log.add_feedback("r3", 1, "corrected answer 3", None)
    log_exchange(log, "r4", "Q1", "good answer 1")  # same exchange again: duplicate text
    log_exchange(log, "r5", "Q5", "half an ans", status="client_disconnected", finish_reason=None)
    log_exchange(log, "r6", "Q6", None, status="error", finish_reason=None)
    log_exchange(log, "r7", "Q7", "answer on another route", route="other")
    log_exchange(log, "r8", "Q8", "cut off mid-sen", finish_reason="length")
    log_exchange(log, "r9", "Q9", "very old answer", created_at=time.time() - 40 * 86400)
    log_exchange(log, "r10", "Q10", "", status="completed")
    log_exchange(log, "r11", "Q11", "answer 11")
    log.begin(
        {"id": "r12", "created_at": time.time() - 5, "model": "house", "route": "house", "path_kind": "prompt",
         "adapters": [], "messages": [{"role": "user", "content": "Q12"}], "params": {}}
    )  # fmt: skip  (never finished: still in_progress)
    log.flush()
    log.close()
    return target


@pytest.fixture()
def log_file(tmp_path: Path) -> Path:
    return fill_log(tmp_path / "conversations.sqlite3")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_log(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The filled log on SQLite or on a real PostgreSQL server: the trainer reads both alike."""
    if request.param == "sqlite":
        return fill_log(tmp_path / "conversations.sqlite3")
    return fill_log(request.getfixturevalue("pg_url"))


def answers(items: list[Item]) -> list[str | None]:
    return sorted(i.answer or "" for i in items)


def test_log_filters_and_drops_with_reasons(any_log: Any, template: ChatTemplate) -> None:
    got = read_log([any_log], SourceConfig(routes=("house",), window_days=30), template)
    assert answers(got.items) == ["answer 11", "corrected answer 3", "good answer 1"]
    assert got.dropped == {
        "rating below 0": 1,
        "duplicate text": 1,
        "status client_disconnected": 1,
        "status error": 1,
        "reply cut off by max_tokens": 1,
        "no assistant reply": 1,
        "status in_progress": 1,
    }


def test_min_rating_one_keeps_only_thumbs_up(any_log: Any, template: ChatTemplate) -> None:
    got = read_log([any_log], SourceConfig(routes=("house",), min_rating=1), template)
    assert answers(got.items) == ["corrected answer 3"]


def test_min_rating_minus_one_keeps_rated_down_and_route_filter_off(any_log: Any, template: ChatTemplate) -> None:
    got = read_log([any_log], SourceConfig(min_rating=-1), template)
    assert "bad answer 2" in answers(got.items)
    assert "answer on another route" in answers(got.items)
    assert "very old answer" in answers(got.items)  # no window


def test_corrected_answer_replaces_the_original(any_log: Any, template: ChatTemplate) -> None:
    got = read_log([any_log], SourceConfig(routes=("house",)), template)
    text = next(i.text for i in got.items if i.answer == "corrected answer 3")
    assert "<|im_start|>assistant\ncorrected answer 3<|im_end|>" in text
    assert all("clumsy answer 3" not in i.text for i in got.items)


def test_logged_system_prompt_is_rendered_first_unless_disabled(tmp_path: Path, template: ChatTemplate) -> None:
    path = tmp_path / "log.sqlite3"
    log = ConversationLog(path)
    log_exchange(log, "s1", "Hello?", "Ahoy.", system_prompt="Talk like a pirate.")
    log.flush()
    log.close()
    kept = read_log([path], SourceConfig(), template).items[0]
    assert kept.text.startswith("<|im_start|>system\nTalk like a pirate.<|im_end|>\n<|im_start|>user\nHello?")
    dropped = read_log([path], SourceConfig(include_system_prompt=False), template).items[0]
    assert "pirate" not in dropped.text and "<|im_start|>user\nHello?" in dropped.text


def test_replica_files_are_deduplicated_by_request_id(tmp_path: Path, template: ChatTemplate) -> None:
    a, b = tmp_path / "conv-a.sqlite3", tmp_path / "conv-b.sqlite3"
    la, lb = ConversationLog(a, replica="a"), ConversationLog(b, replica="b")
    log_exchange(la, "same-id", "Q", "answer A")
    log_exchange(lb, "same-id", "Q", "answer A")
    log_exchange(lb, "only-b", "Q2", "answer B")
    la.add_feedback("only-b", 1, "better answer B", None)  # feedback reached the other replica
    for log in (la, lb):
        log.flush()
        log.close()
    got = read_log([str(tmp_path / "conv-*.sqlite3")], SourceConfig(), template)
    assert len(got.files) == 2
    assert answers(got.items) == ["answer A", "better answer B"]
    assert got.dropped == {"duplicate request id (another replica)": 1}


def test_log_is_read_without_writing_and_ignores_uncommitted_rows(
    log_file: Path, tmp_path: Path, template: ChatTemplate
) -> None:
    writer = sqlite3.connect(log_file, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the server is mid-write
    writer.execute(
        "INSERT INTO exchanges (id, created_at, status, model, route, path_kind, messages, response)"
        " VALUES ('w1', ?, 'completed', 'house', 'house', 'prompt', '[{\"role\":\"user\",\"content\":\"Qw\"}]', 'uncommitted')",
        (time.time(),),
    )
    before = log_file.stat().st_mtime_ns
    source = SourceConfig(routes=("house",), window_days=30)
    plain = read_log([log_file], source, template)
    snap = read_log([log_file], source, template, snapshot_dir=tmp_path / "snaps")
    writer.execute("ROLLBACK")
    writer.close()
    assert answers(plain.items) == answers(snap.items) == ["answer 11", "corrected answer 3", "good answer 1"]
    assert log_file.stat().st_mtime_ns == before
    assert list((tmp_path / "snaps").iterdir()) == []  # snapshots are removed after reading


def test_not_a_log_names_the_file(tmp_path: Path, template: ChatTemplate) -> None:
    path = tmp_path / "empty.sqlite3"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(DatasetError, match="empty.sqlite3: not a conversation log"):
        read_log([path], SourceConfig(), template)


# ---------------------------------------------------------------------------------------------
# Split


def test_split_never_puts_a_conversation_in_both_and_is_stable() -> None:
    items = [Item(text=f"turn {t} of {c}", key=f"conv-{c}", origin="t") for c in range(300) for t in range(3)]
    train, val = split(items, 0.2)
    train_keys, val_keys = {i.key for i in train}, {i.key for i in val}
    assert not train_keys & val_keys
    assert len(train) + len(val) == len(items)
    assert 0.12 < len(val_keys) / 300 < 0.28
    again_train, again_val = split(list(reversed(items)), 0.2)
    assert {i.key for i in again_val} == val_keys  # order-independent: same split every night


def test_build_dataset_splits_log_conversations_by_id(tmp_path: Path, template: ChatTemplate) -> None:
    path = tmp_path / "log.sqlite3"
    log = ConversationLog(path)
    for c in range(60):
        for turn in range(2):
            log_exchange(log, f"r{c}-{turn}", f"question {turn} in {c}", f"answer {turn} in {c}",
                         conversation_id=f"conv-{c}")  # fmt: skip
    log.flush()
    log.close()
    cfg = TrainerConfig(base_model=MODEL, logs=(str(path),), cache_dir=tmp_path / "cache")
    adapter = AdapterConfig(name="x", train=TrainSettings(val_fraction=0.25))
    data = build_dataset(cfg, adapter, template=template, count_tokens=len)
    assert data.report.train_items + data.report.val_items == 120
    assert data.report.val_items > 0
    assert not {i.key for i in data.train} & {i.key for i in data.val}
    assert all(i.key.startswith("conv-") for i in data.train + data.val)


def test_thumbs_down_with_a_correction_trains_on_the_correction(tmp_path: Path, template: ChatTemplate) -> None:
    """The playground's most natural verdict, "bad, it should have said X", must reach training:
    the rating judged the original answer, the correction is what to learn."""
    path = tmp_path / "conversations.sqlite3"
    log = ConversationLog(path)
    log_exchange(log, "d1", "Q1", "wrong answer")
    log.add_feedback("d1", -1, "the right answer", "wrong")
    log_exchange(log, "d2", "Q2", "another wrong answer")
    log.add_feedback("d2", -1, None, "wrong, no correction")
    log.flush()
    log.close()
    for min_rating in (0, 1):
        got = read_log([path], SourceConfig(min_rating=min_rating), template)
        assert answers(got.items) == ["the right answer"]
        assert got.dropped[f"rating below {min_rating}"] == 1


def test_text_completions_and_tool_calls_are_left_out_with_their_reasons(tmp_path: Path, template: ChatTemplate) -> None:
    """What /v1/completions and tool calling log is not a chat answer to learn: dropped, counted."""
    path = tmp_path / "log.sqlite3"
    log = ConversationLog(path)
    log_exchange(log, "c1", "Q", "a chat answer")
    base = {"created_at": time.time() - 60, "model": "base", "route": "base", "path_kind": "base", "adapters": []}
    log.begin({**base, "id": "t1", "messages": [], "params": {"endpoint": "completions", "prompt": "The sea is"}})
    log.finish("t1", {"status": "completed", "response": " blue.", "finish_reason": "stop"})
    log.begin({**base, "id": "t2", "messages": [{"role": "user", "content": "Weather?"}], "params": {}})
    log.finish("t2", {"status": "completed", "response": '{"name": "w", "arguments": {}}', "finish_reason": "tool_calls"})
    log.begin({**base, "id": "t3", "params": {}, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                             "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "Sunny"}]})  # fmt: skip
    log.finish("t3", {"status": "completed", "response": "It is sunny.", "finish_reason": "stop"})
    log.flush()
    log.close()
    got = read_log([path], SourceConfig(), template)
    assert answers(got.items) == ["a chat answer"]
    assert got.dropped == {"text completion, not a chat": 1, "tool calling exchange (not trained on)": 2}
