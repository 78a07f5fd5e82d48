"""The conversation log: SQLite schema, migrations, and the server's single writer.

Owns docs/conversation-log.md. Migrations are ordered functions `m001_...`; `migrate(conn)` applies
the missing ones and is safe to re-run. The server writes through `ConversationLog`, one thread fed
by a queue, so the event loop never waits on disk. The trainer uses `connect`, `migrate` and the
trainer-run helpers.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Migrations


def m001_initial(conn: sqlite3.Connection) -> None:
    conn.executescript(
        """
        CREATE TABLE exchanges (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            finished_at REAL,
            status TEXT NOT NULL,
            model TEXT NOT NULL,
            route TEXT NOT NULL,
            path_kind TEXT NOT NULL,
            fallback_reason TEXT,
            adapters TEXT NOT NULL DEFAULT '[]',
            adapter_name TEXT,
            adapter_version INTEGER,
            system_prompt TEXT,
            messages TEXT NOT NULL,
            response TEXT,
            finish_reason TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            cached_tokens INTEGER,
            ttft_ms REAL,
            duration_ms REAL,
            params TEXT NOT NULL DEFAULT '{}',
            user TEXT,
            conversation_id TEXT,
            error TEXT,
            replica TEXT
        );
        CREATE INDEX exchanges_created ON exchanges(created_at);
        CREATE INDEX exchanges_route ON exchanges(route, created_at);
        CREATE INDEX exchanges_adapter ON exchanges(adapter_name, created_at);
        CREATE INDEX exchanges_conversation ON exchanges(conversation_id);

        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            response_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            rating INTEGER NOT NULL CHECK (rating IN (-1, 0, 1)),
            corrected TEXT,
            comment TEXT
        );
        CREATE INDEX feedback_response ON feedback(response_id);
        """
    )


def m002_trainer_runs(conn: sqlite3.Connection) -> None:
    conn.executescript(
        """
        CREATE TABLE trainer_runs (
            id INTEGER PRIMARY KEY,
            adapter TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            status TEXT NOT NULL,
            version INTEGER,
            reason TEXT,
            metrics TEXT
        );
        CREATE INDEX trainer_runs_adapter ON trainer_runs(adapter, started_at);
        """
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [m001_initial, m002_trainer_runs]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply missing migrations in order; return the names applied."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with conn:
            fn(conn)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (fn.__name__, time.time()))
        applied.append(fn.__name__)
    return applied


def connect(db_path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the log (creating it with mode 0600 and the current schema unless read-only)."""
    path = Path(db_path)
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)
    return conn


# ---------------------------------------------------------------------------------------------
# Trainer runs (used by the trainer; read by the server's metrics)


def start_trainer_run(conn: sqlite3.Connection, adapter: str) -> int:
    with conn:
        cur = conn.execute(
            "INSERT INTO trainer_runs (adapter, started_at, status) VALUES (?, ?, 'running')", (adapter, time.time())
        )
    return int(cur.lastrowid)


def finish_trainer_run(
    conn: sqlite3.Connection,
    run_id: int,
    *,
    status: str,
    version: int | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    with conn:
        conn.execute(
            "UPDATE trainer_runs SET finished_at = ?, status = ?, version = ?, reason = ?, metrics = ? WHERE id = ?",
            (time.time(), status, version, reason, json.dumps(metrics or {}), run_id),
        )


def last_trainer_runs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The latest run per adapter."""
    rows = conn.execute(
        """
        SELECT adapter, started_at, finished_at, status, version, reason, metrics FROM trainer_runs t
        WHERE id = (SELECT max(id) FROM trainer_runs WHERE adapter = t.adapter) ORDER BY adapter
        """
    ).fetchall()
    keys = ("adapter", "started_at", "finished_at", "status", "version", "reason", "metrics")
    out = []
    for row in rows:
        d = dict(zip(keys, row))
        d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
        out.append(d)
    return out


def recent_trainer_runs(conn: sqlite3.Connection, *, limit: int = 20, adapter: str | None = None) -> list[dict[str, Any]]:
    """The newest `limit` runs, newest first, optionally of one adapter (read by GET /v1/runs)."""
    sql = "SELECT id, adapter, started_at, finished_at, status, version, reason, metrics FROM trainer_runs"
    args: list[Any] = []
    if adapter is not None:
        sql += " WHERE adapter = ?"
        args.append(adapter)
    rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
    keys = ("id", "adapter", "started_at", "finished_at", "status", "version", "reason", "metrics")
    out = []
    for row in rows:
        d = dict(zip(keys, row))
        try:
            d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
        except ValueError:  # a run row is written by another process; never let one bad row hide the rest
            d["metrics"] = {}
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------
# The server's writer

EXCHANGE_COLUMNS = (
    "id", "created_at", "finished_at", "status", "model", "route", "path_kind", "fallback_reason",
    "adapters", "adapter_name", "adapter_version", "system_prompt", "messages", "response",
    "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "ttft_ms", "duration_ms",
    "params", "user", "conversation_id", "error", "replica",
)  # fmt: skip
JSON_COLUMNS = {"adapters", "messages", "params"}


def _utf8(v: Any) -> Any:
    """Lone surrogates (valid in JSON "\ud800", not in UTF-8) become U+FFFD, as the tokenizer sees them."""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return v


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _utf8(json.dumps(v, ensure_ascii=False) if k in JSON_COLUMNS else v) for k, v in row.items()}


class ConversationLog:
    """Single writer thread for the exchanges and feedback tables.

    `begin()` inserts an `in_progress` row, `finish()` moves it to its final status. Calls are queued
    and return at once; `flush()` waits until everything queued so far is on disk.
    """

    def __init__(self, db_path: Path, *, replica: str | None = None, retention_days: float = 0) -> None:
        self._path = Path(db_path)
        self._replica = replica
        self._retention_s = retention_days * 86400
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._conn = connect(self._path)
        interrupted = self._conn.execute(
            "UPDATE exchanges SET status = 'interrupted', finished_at = ? WHERE status = 'in_progress'",
            (time.time(),),
        ).rowcount
        if interrupted:
            log.warning("marked %d exchanges left in_progress by a previous run as interrupted", interrupted)
        self._last_retention = 0.0
        self._thread = threading.Thread(target=self._run, name="conversation-log", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        return self._path

    def begin(self, row: dict[str, Any]) -> None:
        row = {**row, "status": "in_progress", "replica": self._replica}
        self._queue.put(("begin", _encode(row)))

    def finish(self, exchange_id: str, fields: dict[str, Any]) -> None:
        self._queue.put(("finish", (exchange_id, _encode({**fields, "finished_at": time.time()}))))

    def add_feedback(self, response_id: str, rating: int, corrected: str | None, comment: str | None) -> None:
        self._queue.put(("feedback", (response_id, time.time(), rating, _utf8(corrected), _utf8(comment))))

    def flush(self, timeout: float = 10.0) -> None:
        done = threading.Event()
        self._queue.put(("flush", done))
        done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._conn.close()

    # reads happen on the caller's thread with their own short-lived connection
    def exchange_exists(self, exchange_id: str) -> bool:
        conn = connect(self._path, readonly=True)
        try:
            return conn.execute("SELECT 1 FROM exchanges WHERE id = ?", (exchange_id,)).fetchone() is not None
        finally:
            conn.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload = item
            try:
                self._apply(kind, payload)
            except Exception:  # one bad row must never stop the writer
                log.exception("conversation log write failed (%s)", kind)
            if time.monotonic() - self._last_retention > 3600:
                self._apply_retention()

    def _apply(self, kind: str, payload: Any) -> None:
        c = self._conn
        if kind == "begin":
            cols = [k for k in EXCHANGE_COLUMNS if k in payload]
            c.execute(
                f"INSERT OR REPLACE INTO exchanges ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [payload[k] for k in cols],
            )
        elif kind == "finish":
            exchange_id, fields = payload
            cols = [k for k in EXCHANGE_COLUMNS if k in fields and k != "id"]
            c.execute(
                f"UPDATE exchanges SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?",
                [fields[k] for k in cols] + [exchange_id],
            )
        elif kind == "feedback":
            c.execute(
                "INSERT INTO feedback (response_id, created_at, rating, corrected, comment) VALUES (?, ?, ?, ?, ?)",
                payload,
            )
        elif kind == "flush":
            payload.set()

    def _apply_retention(self) -> None:
        self._last_retention = time.monotonic()
        if self._retention_s <= 0:
            return
        cutoff = time.time() - self._retention_s
        try:
            n = self._conn.execute("DELETE FROM exchanges WHERE created_at < ?", (cutoff,)).rowcount
            self._conn.execute("DELETE FROM feedback WHERE created_at < ?", (cutoff,))
            if n:
                log.info("retention: deleted %d exchanges older than the retention window", n)
        except sqlite3.Error:
            log.exception("retention delete failed")
