"""Every exchange lands in the conversation log, on SQLite and on a real PostgreSQL server; metrics
move; feedback is recorded."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ServerProcess, chat_body, log_rows, start_shared_server


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def logged(request: pytest.FixtureRequest, tmp_path_factory, model_path, base_info) -> Iterator[ServerProcess]:
    """A server with the shared routes whose conversation log is the default SQLite file (the
    session's shared server) or a database on a real PostgreSQL server (CHAT_DB_URL)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("server")
        return
    url = request.getfixturevalue("postgres").create_database("log_tests")
    srv = start_shared_server(tmp_path_factory.mktemp("pg-server"), model_path, base_info, db_url=url,
                              replica="pg-0")
    yield srv
    srv.stop()


def wait_row(db, sql: str, args: tuple, *, until=lambda row: row is not None, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        rows = log_rows(db, sql, args)
        row = rows[0] if rows else None
        if until(row):
            return row
        time.sleep(0.05)
    return row


def test_exchange_row_has_route_adapter_version_and_tokens(logged: ServerProcess) -> None:
    conv = secrets.token_hex(4)
    with logged.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(model="styled", user="bob"),
                      headers={"X-Conversation-Id": conv})
    body = r.json()
    row = wait_row(logged.db, "SELECT * FROM exchanges WHERE id = ?", (body["id"],),
                   until=lambda row: row is not None and row["status"] == "completed")
    assert row["route"] == "styled" and row["path_kind"] == "finetuned"
    assert row["adapter_name"] == "style-a" and row["adapter_version"] == 1
    assert json.loads(row["adapters"]) == [{"name": "style-a", "version": 1, "scale": 1.0}]
    assert row["response"] == body["choices"][0]["message"]["content"]
    assert row["finish_reason"] == body["choices"][0]["finish_reason"]
    assert row["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert row["completion_tokens"] == body["usage"]["completion_tokens"]
    assert json.loads(row["messages"]) == [{"role": "user", "content": "Say hello."}]
    assert row["user"] == "bob" and row["conversation_id"] == conv
    assert row["duration_ms"] > 0 and row["ttft_ms"] > 0
    assert json.loads(row["params"])["temperature"] == 0


def test_prompt_route_row_records_the_system_prompt(logged: ServerProcess) -> None:
    with logged.http() as http:
        rid = http.post("/v1/chat/completions", json=chat_body(model="pirate")).json()["id"]
    row = wait_row(logged.db, "SELECT * FROM exchanges WHERE id = ?", (rid,),
                   until=lambda row: row is not None and row["status"] == "completed")
    assert row["path_kind"] == "prompt" and row["adapter_name"] is None
    assert "Black Pearl" in row["system_prompt"]


def test_route_with_logging_off_writes_no_row(logged: ServerProcess) -> None:
    with logged.http() as http:
        rid = http.post("/v1/chat/completions", json=chat_body(model="quiet", max_tokens=2)).json()["id"]
        marker = http.post("/v1/chat/completions", json=chat_body(max_tokens=2)).json()["id"]
    assert wait_row(logged.db, "SELECT 1 FROM exchanges WHERE id = ?", (marker,)) is not None
    assert wait_row(logged.db, "SELECT 1 FROM exchanges WHERE id = ?", (rid,), timeout=0.5) is None


def test_feedback_is_stored_and_counted_by_route_and_path(logged: ServerProcess) -> None:
    with logged.http() as http:
        rid = http.post("/v1/chat/completions", json=chat_body(model="styled", max_tokens=4)).json()["id"]
        before = logged.metric("chat_feedback_total", route="styled", path="finetuned", rating="up")
        r = http.post("/v1/feedback", json={"response_id": rid, "rating": 1, "corrected": "Better answer."})
        assert r.status_code == 200, r.text
        assert logged.metric("chat_feedback_total", route="styled", path="finetuned", rating="up") == before + 1
        missing = http.post("/v1/feedback", json={"response_id": "chatcmpl-nope", "rating": 1})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "response_not_found"
        assert missing.json()["error"]["param"] == "response_id"
        bad = http.post("/v1/feedback", json={"response_id": rid, "rating": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    row = wait_row(logged.db, "SELECT * FROM feedback WHERE response_id = ?", (rid,))
    assert row["rating"] == 1 and row["corrected"] == "Better answer."


def test_client_disconnect_mid_stream_stops_generation_and_is_logged(logged: ServerProcess) -> None:
    body = chat_body("Write a very long essay about the history of ships.", max_tokens=900, stream=True)
    with httpx.Client(base_url=logged.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            rid = r.headers["x-request-id"]
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break  # leave after a few chunks
    row = wait_row(logged.db, "SELECT * FROM exchanges WHERE id = ?", (rid,),
                   until=lambda row: row is not None and row["status"] != "in_progress", timeout=20)
    assert row["status"] == "client_disconnected"
    assert row["completion_tokens"] < 900


def test_client_disconnect_during_non_streaming_request_stops_generation(logged: ServerProcess) -> None:
    body = chat_body("Write a very long essay about the history of ships.", max_tokens=900, user="leaver")
    with httpx.Client(base_url=logged.url, timeout=1.0) as http:
        try:
            http.post("/v1/chat/completions", json=body)
        except httpx.ReadTimeout:
            pass
    row = wait_row(logged.db, "SELECT * FROM exchanges WHERE \"user\" = 'leaver' ORDER BY created_at DESC", (),
                   until=lambda row: row is not None and row["status"] != "in_progress", timeout=30)
    assert row["status"] == "client_disconnected"
    assert row["completion_tokens"] < 900


def test_request_metrics_move(server: ServerProcess) -> None:
    labels = dict(route="pirate", path="prompt", status="200")
    before = server.metric("chat_requests_total", **labels)
    ttft_before = server.metric("chat_time_to_first_token_seconds_count", route="pirate", path="prompt")
    tokens_before = server.metric("chat_completion_tokens_total", route="pirate", path="prompt")
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(model="pirate", max_tokens=5)).json()
    assert server.metric("chat_requests_total", **labels) == before + 1
    assert server.metric("chat_time_to_first_token_seconds_count", route="pirate", path="prompt") == ttft_before + 1
    assert server.metric("chat_completion_tokens_total", route="pirate",
                         path="prompt") == tokens_before + r["usage"]["completion_tokens"]
    assert server.metric("adapters_loaded") >= 0
    assert server.metric("engine_steps_total") > 0


def test_junk_model_names_do_not_grow_the_metric_series(server: ServerProcess) -> None:
    def series() -> int:
        text = httpx.get(f"{server.url}/metrics", timeout=60).text
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    with server.http() as http:
        http.post("/v1/chat/completions", json=chat_body(model="junk-0"))  # first 404 creates the 'unknown' series
        before = series()
        for i in range(200):
            r = http.post("/v1/chat/completions", json=chat_body(model=f"junk-{i}-{secrets.token_hex(4)}"))
            assert r.status_code == 404
    assert series() == before
    assert server.metric("chat_requests_total", route="unknown", status="404") >= 200


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_trainer_runs_can_live_in_their_own_database(fresh_server, tmp_path, request, backend) -> None:
    """Replicas log to one file each (deploy/k8s); the trainer records its runs in a shared
    database named by CHAT_TRAINER_RUNS_DB (a SQLite file or a PostgreSQL URL), and every
    replica's /metrics and /v1/runs read it from there."""
    from adapter_chat import store

    if backend == "sqlite":
        runs_db = tmp_path / "trainer-runs.sqlite3"
    else:
        runs_db = request.getfixturevalue("pg_url")
    engine = store.open_db(runs_db)
    run_id = store.start_trainer_run(engine, "house-style")
    store.finish_trainer_run(engine, run_id, status="published", version=3, reason=None, metrics={"items": 12})
    engine.dispose()
    srv = fresh_server(trainer_runs_db=runs_db, db_path=tmp_path / "conversations-replica-0.sqlite3")
    with srv.http() as http:
        runs = http.get("/v1/runs").json()["data"]
    assert [(r["adapter"], r["status"], r["version"]) for r in runs] == [("house-style", "published", 3)]
    assert srv.metric("trainer_last_run_version", adapter="house-style") == 3
