"""The conversation log on a full disk (docs/conversation-log.md, "When the log cannot be written").

The database lives on a real small filesystem (a tmpfs of a few MB, tests/smallfs.py) that we fill
up: SQLite meets the real ENOSPC. The policy under test: the server keeps serving; rows that cannot
be written are held in memory, in order, and retried; past the bound new rows are dropped and
counted, never silently; when space returns the held rows land, without a restart.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from server.metrics import Metrics
from adapter_chat.store import ConversationLog
from tests.conftest import ServerProcess, chat_body, passive_omp
from tests.reliability import db_rows, record
from tests.smallfs import fill, small_filesystem

URL = "/v1/chat/completions"


def row(i: int, tag: str) -> dict[str, Any]:
    return {"id": f"{tag}-{i}", "created_at": time.time(), "model": "base", "route": "base", "path_kind": "base",
            "adapters": [], "messages": [{"role": "user", "content": f"question {i} " + "x" * 300}], "params": {}}


def wait_for(pred, timeout: float = 30.0) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def scrape(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith("conversation_log_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_full_disk_holds_rows_in_memory_counts_drops_and_lands_them_when_space_returns(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "fs", 2 << 20) as fs:
        clog = ConversationLog(fs / "log.sqlite3", max_pending_rows=40, retry_min_s=0.05, retry_max_s=0.5)
        metrics = Metrics()
        metrics.bind_conversation_log(clog)
        try:
            for i in range(5):
                clog.begin(row(i, "before"))
                clog.finish(f"before-{i}", {"status": "completed", "response": "ok"})
            assert clog.flush()
            filler = fill(fs / "filler")
            t_full = time.monotonic()
            # 60 exchanges while the disk is full: 40 fit the bound, 20 are dropped and counted
            for i in range(60):
                clog.begin(row(i, "full"))
                clog.finish(f"full-{i}", {"status": "completed", "response": f"answer {i}"})
            clog.add_feedback("before-0", 1, None, "while full")
            t0 = time.monotonic()
            flushed = clog.flush()
            flush_s = time.monotonic() - t0
            during = clog.stats()
            scraped = scrape(metrics)
            on_disk = db_rows(fs / "log.sqlite3", "SELECT count(*) FROM exchanges")[0][0]
            assert not flushed and flush_s < 2.0  # flush says "not on disk" at once, it does not wait out the outage
            assert not during["writable"] and during["pending_rows"] == 40 and during["dropped_rows"] == 20
            assert not during["accepting"] and "full" in during["last_error"]
            assert on_disk == 5
            assert scraped["conversation_log_writable"] == 0 and scraped["conversation_log_pending_rows"] == 40
            assert scraped["conversation_log_dropped_rows_total"] == 20
            # space returns: the held rows land without a restart
            filler.unlink()
            t_free = time.monotonic()
            recovered_s = wait_for(lambda: clog.stats()["pending_rows"] == 0 and clog.stats()["writable"])
            after = clog.stats()
            clog.begin(row(0, "after"))
            clog.finish("after-0", {"status": "completed", "response": "ok"})
            assert clog.flush()
            rows = {r["id"]: r for r in db_rows(fs / "log.sqlite3", "SELECT id, status, response FROM exchanges")}
            feedback = db_rows(fs / "log.sqlite3", "SELECT comment FROM feedback")
            integrity = db_rows(fs / "log.sqlite3", "PRAGMA integrity_check")[0][0]
        finally:
            clog.close()
    held_ids = [f"full-{i}" for i in range(40)]
    record("log_disk_full_store", {
        "rows_while_full": 60, "bound": 40, "held": during["pending_rows"], "dropped_counted": during["dropped_rows"],
        "write_failures": during["write_failures"], "outage_s": round(t_free - t_full, 2),
        "recovered_after_free_s": None if recovered_s is None else round(recovered_s, 2),
        "held_rows_landed": sum(rows.get(i, {"status": None})["status"] == "completed" for i in held_ids),
        "integrity": integrity, "flush_returned_in_s": round(flush_s, 3),
    })
    assert recovered_s is not None and recovered_s < 5.0, after
    assert after["dropped_rows"] == 20 and after["writable"]
    assert all(rows[i]["status"] == "completed" and rows[i]["response"] == f"answer {i.split('-')[1]}" for i in held_ids)
    assert not any(f"full-{i}" in rows for i in range(40, 60))  # dropped at the bound, and counted above
    assert "after-0" in rows and len(rows) == 5 + 40 + 1
    assert [f["comment"] for f in feedback] == []  # feedback past the bound is dropped and counted too
    assert after["dropped_feedback"] == 1
    assert integrity == "ok"


def test_server_keeps_serving_on_a_full_log_disk_and_recovers_without_a_restart(tmp_path: Path, model_path) -> None:
    with small_filesystem(tmp_path / "fs", 4 << 20) as fs:
        work = tmp_path / "srv"
        work.mkdir()
        with passive_omp():
            srv = ServerProcess(work, model_path, db_path=fs / "log.sqlite3", parallel=2)
        try:
            pid = srv.proc.pid
            tag = uuid.uuid4().hex[:8]

            def ask(i: int, stream: bool) -> tuple[int, str | None, bool]:
                body = chat_body(f"Question {i}: name a colour.", max_tokens=6, stream=stream, user=f"{tag}-{i}")
                with srv.http() as http:
                    r = http.post(URL, json=body)
                done = not stream or r.text.rstrip().endswith("data: [DONE]")
                return r.status_code, r.headers.get("x-request-id"), done

            warm = [ask(i, False) for i in range(2)]
            assert all(c == 200 for c, _, _ in warm)
            filler = fill(fs / "filler")
            answered = [ask(i, bool(i % 2)) for i in range(2, 14)]
            ids = [rid for _, rid, _ in answered]
            missing_during = [i for i in ids if not db_rows(srv.db_path, "SELECT 1 FROM exchanges WHERE id = ?", (i,))]
            ready = httpx.get(f"{srv.url}/ready", timeout=10).status_code
            writable_metric = srv.metric("conversation_log_writable")
            pending_metric = srv.metric("conversation_log_pending_rows")
            with srv.http() as http:  # feedback on an answer whose row is held in memory: not found yet
                fb = http.post("/v1/feedback", json={"response_id": ids[0], "rating": 1}).status_code
            alive_during = srv.proc.poll() is None
            filler.unlink()

            def landed() -> bool:
                rows = db_rows(srv.db_path, f"SELECT status FROM exchanges WHERE id IN ({','.join('?' * len(ids))})",
                               tuple(ids))
                return len(rows) == len(ids) and all(r["status"] == "completed" for r in rows)

            recovered_s = wait_for(landed, timeout=30)
            code, rid, _ = ask(99, False)
            after_ok = wait_for(lambda: bool(db_rows(srv.db_path, "SELECT 1 FROM exchanges WHERE id = ? AND "
                                                     "status = 'completed'", (rid,))), timeout=10) is not None
            integrity = db_rows(srv.db_path, "PRAGMA integrity_check")[0][0]
            srv_metric_after = {"writable": srv.metric("conversation_log_writable"),
                                "pending": srv.metric("conversation_log_pending_rows")}
            logs = srv.logs()
            same_process = srv.proc.pid == pid and srv.proc.poll() is None
        finally:
            srv.stop()
    record("log_disk_full_server", {
        "requests_while_full": len(answered), "answered_200": sum(c == 200 and d for c, _, d in answered),
        "rows_missing_while_full": len(missing_during), "ready_while_full": ready, "feedback_while_full": fb,
        "recovered_after_free_s": None if recovered_s is None else round(recovered_s, 2),
        "rows_landed": len(ids) if recovered_s is not None else "no", "restarts": int(not same_process),
        "integrity": integrity,
    })
    assert alive_during and all(c == 200 and d for c, _, d in answered), answered
    assert missing_during, "the disk was not full: rows were written"
    assert ready == 200  # the policy: ready while the held rows are within their bound
    assert writable_metric == 0 and pending_metric >= len(missing_during), (writable_metric, pending_metric)
    assert srv_metric_after["writable"] == 1 and srv_metric_after["pending"] == 0, srv_metric_after
    assert fb == 404, fb  # 4xx, never 5xx: the row is not on disk yet
    assert "conversation log cannot be written" in logs and "writable again" in logs, logs[-3000:]
    assert recovered_s is not None and recovered_s < 10, recovered_s
    assert code == 200 and after_ok
    assert same_process and integrity == "ok"


def test_flush_reports_success_on_a_healthy_disk(tmp_path: Path) -> None:
    clog = ConversationLog(tmp_path / "log.sqlite3")
    try:
        clog.begin(row(1, "ok"))
        assert clog.flush()
        st = clog.stats()
        assert st["writable"] and st["pending_rows"] == 0 and st["dropped_rows"] == 0 and st["accepting"]
    finally:
        clog.close()
    assert json.loads(db_rows(tmp_path / "log.sqlite3", "SELECT messages FROM exchanges")[0][0])[0]["role"] == "user"
