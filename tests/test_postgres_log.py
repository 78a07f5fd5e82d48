"""The conversation log on a real PostgreSQL server, shared by replicas (docs/conversation-log.md,
"PostgreSQL"): two servers write one database while the trainer reads it; the database stopped
and restarted under load loses and duplicates nothing; rows of one replica are never touched by
another's restart; an exchange logged twice is one row and one training item.

The shared log tests (tests/test_log_and_metrics.py, tests/test_trainer_dataset.py) also run on
PostgreSQL; this file holds what only a shared database can show.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter_chat.chat_template import ChatTemplate
from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.store import ConversationLog
from tests.conftest import chat_body, log_rows, wait_for
from tests.postgres import PostgresServer
from tests.reliability import record
from trainer.config import SourceConfig
from trainer.dataset import read_log

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.from_model(BaseModelInfo.load(MODEL, sha256="-"))


def _row(rid: str, question: str = "Q", **kw: Any) -> dict[str, Any]:
    return {"id": rid, "created_at": time.time() - 60, "model": "house", "route": "house", "path_kind": "prompt",
            "adapters": [], "messages": [{"role": "user", "content": question}], "params": {}, **kw}


class Load:
    """Clients sending short chat requests to servers until stopped; collects the answered ids."""

    def __init__(self, urls: list[str], clients_per_server: int = 2, tag: str = "load") -> None:
        self.acked: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(url, f"{tag}-{i}-{k}"), daemon=True)
                         for i, url in enumerate(urls) for k in range(clients_per_server)]  # fmt: skip
        for t in self._threads:
            t.start()

    def _client(self, url: str, user: str) -> None:
        n = 0
        with httpx.Client(base_url=url, timeout=120) as http:
            while not self._stop.is_set():
                n += 1
                body = chat_body(f"Name a colour, {user} #{n}.", max_tokens=6, user=user)
                try:
                    r = http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as e:
                    with self._lock:
                        self.errors.append(f"{type(e).__name__}: {e}")
                    time.sleep(0.5)
                    continue
                with self._lock:
                    if r.status_code == 200:
                        self.acked.append(r.json()["id"])
                    else:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)


def _statuses(target: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in log_rows(target, "SELECT id, status FROM exchanges"):
        out.setdefault(r["id"], []).append(r["status"])
    return out


def test_two_servers_write_one_database_while_the_trainer_reads_it(
    fresh_passive_server, pg_url: str, template: ChatTemplate
) -> None:
    servers = [fresh_passive_server(db_url=pg_url, replica=name, parallel=2, n_ctx=512) for name in ("a", "b")]
    load = Load([s.url for s in servers])
    reads: list[int] = []
    deadline = time.monotonic() + 240
    try:
        while load.count() < 16 and time.monotonic() < deadline:  # the trainer reads while both servers write
            got = read_log([pg_url], SourceConfig(), template)
            assert "duplicate request id (another replica)" not in got.dropped
            reads.append(len(got.items) + sum(got.dropped.values()))
            time.sleep(0.2)
    finally:
        load.stop()
    assert load.errors == []
    acked = set(load.acked)
    assert wait_for(lambda: all(_statuses(pg_url).get(i) == ["completed"] for i in acked), timeout=30)
    rows = log_rows(pg_url, "SELECT replica, count(*) AS n FROM exchanges GROUP BY replica ORDER BY replica")
    assert [r["replica"] for r in rows] == ["a", "b"] and sum(r["n"] for r in rows) == len(acked)
    # every read saw a consistent, growing log; the last one sees every exchange once
    assert len(reads) >= 2 and reads == sorted(reads)
    final = read_log([pg_url], SourceConfig(), template)
    assert len(final.items) + sum(final.dropped.values()) == len(acked)
    assert {o.origin.rsplit("#", 1)[1] for o in final.items} <= acked
    for s in servers:
        assert s.metric("conversation_log_dropped_rows_total") == 0


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, which it may stop and start."""
    pg = PostgresServer()
    yield pg
    pg.close()


def test_database_restarted_under_load_loses_and_duplicates_nothing(fresh_passive_server, own_postgres) -> None:
    pg = own_postgres
    url = pg.create_database("restart")
    srv = fresh_passive_server(db_url=url, replica="r", parallel=2, n_ctx=512)
    load = Load([srv.url], clients_per_server=3)
    held_peak = 0.0
    outages: list[dict[str, Any]] = []
    try:
        assert wait_for(lambda: load.count() >= 4, timeout=60)
        for mode in ("fast", "immediate"):  # a clean shutdown, then a crash of the database
            before = load.count()
            pg.stop(mode)
            assert wait_for(lambda: srv.metric("conversation_log_writable") == 0, timeout=30)
            assert wait_for(lambda b=before: load.count() >= b + 4, timeout=60)  # the server keeps answering
            held = srv.metric("conversation_log_pending_rows")
            held_peak = max(held_peak, held)
            assert held > 0
            assert httpx.get(f"{srv.url}/ready", timeout=10).status_code == 200  # held, within the bound
            pg.start()
            assert wait_for(lambda: srv.metric("conversation_log_writable") == 1
                            and srv.metric("conversation_log_pending_rows") == 0, timeout=60)
            outages.append({"mode": mode, "answered_while_down": load.count() - before, "held_rows": held})
    finally:
        load.stop()
    assert load.errors == []
    acked = load.acked
    assert wait_for(lambda: all(_statuses(url).get(i) == ["completed"] for i in acked), timeout=30)
    statuses = _statuses(url)
    lost = sum(1 for i in acked if i not in statuses)
    duplicated = sum(len(v) - 1 for v in statuses.values())
    not_completed = sum(1 for i in acked if statuses.get(i) not in (None, ["completed"]))
    dropped = srv.metric("conversation_log_dropped_rows_total")
    record("postgres_restart", {"answered": len(acked), "rows": len(statuses), "lost": lost, "duplicated": duplicated,
                                "not_completed": not_completed, "dropped": dropped, "outages": outages})
    print(f"postgres restarts: {len(acked)} answered, {len(statuses)} rows, {lost} lost, {duplicated} duplicated, "
          f"{dropped} dropped; outages {outages}")
    assert (lost, duplicated, not_completed, dropped) == (0, 0, 0, 0)
    assert len(statuses) == len(acked)


def test_rows_past_the_bound_are_dropped_and_counted_while_postgres_is_down(own_postgres) -> None:
    url = own_postgres.create_database("bound")
    log = ConversationLog(url, replica="a", max_pending_rows=3, retry_max_s=0.2)
    try:
        own_postgres.stop("fast")
        for i in range(5):
            log.begin(_row(f"b{i}"))
            log.finish(f"b{i}", {"status": "completed", "response": "ok"})
        assert not log.flush()  # cannot be written now: returns at once
        st = log.stats()
        assert not st["writable"] and st["pending_rows"] == 3 and st["dropped_rows"] == 2 and not log.accepting
        own_postgres.start()
        assert wait_for(log.flush, timeout=30)
        assert log.accepting and log.stats()["writable"]
        assert _statuses(url) == {f"b{i}": ["completed"] for i in range(3)}
    finally:
        log.close()


def test_a_replica_marks_only_its_own_rows_interrupted(pg_url: str) -> None:
    """Rows left in_progress are marked interrupted at start-up; on a shared database, only those
    of the replica starting, never another replica's live requests."""
    a, b = ConversationLog(pg_url, replica="a"), ConversationLog(pg_url, replica="b")
    a.begin(_row("a-left"))  # a dies with this request running
    b.begin(_row("b-live"))  # b is answering this one right now
    assert a.flush() and b.flush()
    a.close()
    c = ConversationLog(pg_url, replica="c")  # a third replica starts
    assert c.flush()
    assert _statuses(pg_url) == {"a-left": ["in_progress"], "b-live": ["in_progress"]}
    a2 = ConversationLog(pg_url, replica="a")  # a restarts
    assert a2.flush()
    assert _statuses(pg_url) == {"a-left": ["interrupted"], "b-live": ["in_progress"]}
    b.finish("b-live", {"status": "completed", "response": "fine"})
    assert b.flush()
    assert _statuses(pg_url)["b-live"] == ["completed"]
    for log in (b, c, a2):
        log.close()


def test_an_exchange_logged_by_two_replicas_is_one_row_and_one_item(pg_url: str, template: ChatTemplate) -> None:
    a, b = ConversationLog(pg_url, replica="a"), ConversationLog(pg_url, replica="b")
    for log in (a, b):  # a retried request that reached both replicas with the same id
        log.begin(_row("same-id", "Which colour?"))
        log.finish("same-id", {"status": "completed", "response": "Blue.", "finish_reason": "stop"})
    b.add_feedback("same-id", 1, "Blue, always.", None)
    assert a.flush() and b.flush()
    assert _statuses(pg_url) == {"same-id": ["completed"]}
    got = read_log([pg_url], SourceConfig(), template)
    assert [i.answer for i in got.items] == ["Blue, always."] and not got.dropped
    for log in (a, b):
        log.close()


def test_trainer_runs_command_reads_postgres(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from adapter_chat.store import finish_trainer_run, open_db, start_trainer_run
    from trainer.__main__ import main

    engine = open_db(pg_url)
    finish_trainer_run(engine, start_trainer_run(engine, "house"), status="published", version=4)
    engine.dispose()
    assert main(["runs", "--db", pg_url, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["adapter"], row["status"], row["version"]) == ("house", "published", 4)


def test_an_unreachable_database_at_start_up_fails_fast_and_names_it(own_postgres) -> None:
    from adapter_chat.store import LogUnavailable, open_db

    url = own_postgres.create_database("gone").replace("chat@", "chat:secret@")
    own_postgres.stop("fast")
    with pytest.raises(LogUnavailable, match=r"cannot open the conversation log postgresql\+psycopg://chat:\*\*\*@") as e:
        open_db(url)
    assert "secret" not in str(e.value)
