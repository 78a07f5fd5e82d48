"""The conversation log: SQLite schema, migrations, and the server's single writer.

Owns docs/conversation-log.md. Migrations are ordered functions `m001_...`; `migrate(conn)` applies
the missing ones and is safe to re-run. The server writes through `ConversationLog`, one thread fed
by a queue, so the event loop never waits on disk. The trainer uses `connect`, `migrate` and the
trainer-run helpers.
"""

from __future__ import annotations

import collections
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


def _size(payload: Any) -> int:
    """Rough bytes held in memory for one queued write (the text it carries)."""
    if isinstance(payload, dict):
        return 64 + sum(len(v) if isinstance(v, str) else 8 for v in payload.values())
    if isinstance(payload, (tuple, list)):
        return sum(_size(v) if isinstance(v, (dict, tuple, list)) else len(v) if isinstance(v, str) else 8
                   for v in payload)
    return 8


def _is_disk_problem(e: BaseException) -> bool:
    """Errors that a later retry can cure: full disk, I/O error, file unavailable, locked.

    Anything else (a value SQLite refuses) is a problem of the row itself: retrying cannot help.
    """
    if not isinstance(e, sqlite3.Error):
        return False
    name = getattr(e, "sqlite_errorname", "") or ""  # Python 3.11+
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_BUSY", "SQLITE_LOCKED",
                        "SQLITE_READONLY", "SQLITE_PROTOCOL", "SQLITE_NOTADB")):
        return True
    text = str(e).lower()
    return any(m in text for m in ("disk is full", "disk i/o error", "unable to open", "database is locked",
                                   "readonly database"))


class ConversationLog:
    """Single writer thread for the exchanges and feedback tables.

    `begin()` inserts an `in_progress` row, `finish()` moves it to its final status. Calls are queued
    and return at once; `flush()` waits until everything queued so far is on disk.

    When the database cannot be written (a full disk, an I/O error: docs/conversation-log.md, "When
    the log cannot be written") the writer keeps every queued row in memory, in order, and retries
    with a backoff (at most every `retry_max_s`) until a write succeeds; the server keeps serving.
    Held rows are bounded by `max_pending_rows` and `max_pending_bytes`: past the bound a new row is
    dropped and counted (`stats()["dropped_rows"]`, an error in the log), never lost silently; the
    final status of a row already held is always kept. `accepting` is False while the bound is
    reached (readiness can report it).
    """

    def __init__(
        self,
        db_path: Path,
        *,
        replica: str | None = None,
        retention_days: float = 0,
        max_pending_rows: int = 10_000,
        max_pending_bytes: int = 64 << 20,
        retry_min_s: float = 0.25,
        retry_max_s: float = 5.0,
    ) -> None:
        self._path = Path(db_path)
        self._replica = replica
        self._retention_s = retention_days * 86400
        self.max_pending_rows = max_pending_rows
        self.max_pending_bytes = max_pending_bytes
        self._retry_min_s, self._retry_max_s = retry_min_s, retry_max_s
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._conn = connect(self._path)
        # held by the writer thread only: ops not yet on disk, in order, as (kind, payload, size)
        self._held: collections.deque[tuple[str, Any, int]] = collections.deque()
        self._dropped_ids: set[str] = set()  # rows dropped at the bound: their finish is ignored too
        self._lock = threading.Lock()  # guards the counters read by stats() from other threads
        self._held_rows = self._held_bytes = 0
        self._dropped_rows = self._dropped_feedback = self._write_failures = 0
        self._failing_since: float | None = None
        self._last_error: str | None = None
        self._backoff = retry_min_s
        self._next_attempt = 0.0
        self._last_outage_log = 0.0
        self._last_retention = 0.0
        # rows left in_progress by a previous run: the writer's first write, so a full disk at start-up
        # delays the marking instead of stopping the server
        self._queue.put(("interrupted", time.time()))
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

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call is on disk; False when it is not (the
        database cannot be written now, or the timeout passed). Never waits out a disk outage."""
        done = threading.Event()
        result: list[bool] = []
        self._queue.put(("flush", (done, result)))
        return done.wait(timeout) and bool(result and result[0])

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._conn.close()

    @property
    def accepting(self) -> bool:
        """False while the rows held in memory reached their bound (new rows are being dropped)."""
        with self._lock:
            return self._held_rows < self.max_pending_rows and self._held_bytes < self.max_pending_bytes

    def stats(self) -> dict[str, Any]:
        """The writer's state, for metrics and readiness."""
        with self._lock:
            return {
                "writable": self._failing_since is None,
                "pending_rows": self._held_rows,
                "pending_bytes": self._held_bytes,
                "dropped_rows": self._dropped_rows,
                "dropped_feedback": self._dropped_feedback,
                "write_failures": self._write_failures,
                "failing_for_s": 0.0 if self._failing_since is None else time.monotonic() - self._failing_since,
                "last_error": self._last_error,
                "accepting": self._held_rows < self.max_pending_rows and self._held_bytes < self.max_pending_bytes,
            }

    # reads happen on the caller's thread with their own short-lived connection
    def exchange_exists(self, exchange_id: str) -> bool:
        conn = connect(self._path, readonly=True)
        try:
            return conn.execute("SELECT 1 FROM exchanges WHERE id = ?", (exchange_id,)).fetchone() is not None
        finally:
            conn.close()

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            wait = None if not self._held else max(0.0, self._next_attempt - time.monotonic())
            try:
                items = [self._queue.get(timeout=wait)]
            except queue.Empty:
                items = []
            while True:  # take everything queued now: one transaction for all of it
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            flushes, closing = [], False
            for item in items:
                if item is None:
                    closing = True
                elif item[0] == "flush":
                    flushes.append(item[1])
                else:
                    self._admit(*item)
            if closing or flushes or not self._held or time.monotonic() >= self._next_attempt:
                self._write_held()
            for done, result in flushes:
                result.append(not self._held)
                done.set()
            if closing:
                if self._held:
                    with self._lock:
                        lost = self._held_rows
                        self._dropped_rows += lost
                    log.error("conversation log: closing with %d rows that could not be written (%s); they are "
                              "lost", lost, self._last_error)
                return
            if not self._held and time.monotonic() - self._last_retention > 3600:
                self._apply_retention()

    def _admit(self, kind: str, payload: Any) -> None:
        """Hold one write, or drop it (counted) when the held rows reached their bound."""
        size = _size(payload)
        with self._lock:
            full = self._held_rows >= self.max_pending_rows or self._held_bytes + size > self.max_pending_bytes
            if kind == "begin" and full:
                self._dropped_rows += 1
                self._dropped_ids.add(payload["id"])
                first = self._dropped_rows == 1 or self._dropped_rows % 1000 == 0
            elif kind == "feedback" and full:
                self._dropped_feedback += 1
                first = self._dropped_feedback == 1
            else:
                first = None
                if kind == "finish" and payload[0] in self._dropped_ids:
                    self._dropped_ids.discard(payload[0])  # its row was dropped (and counted)
                    return
                self._held.append((kind, payload, size))
                self._held_bytes += size
                self._held_rows += kind == "begin"
        if first is not None and first:
            log.error("conversation log: %d rows held in memory (bound %d rows / %d bytes) while the database "
                      "cannot be written (%s); dropping new rows: %d exchanges, %d feedback so far",
                      self._held_rows, self.max_pending_rows, self.max_pending_bytes, self._last_error,
                      self._dropped_rows, self._dropped_feedback)

    def _write_held(self) -> None:
        """Write every held op in one transaction; on a disk problem keep them all and back off."""
        if not self._held:
            return
        ops = list(self._held)
        try:
            self._transaction(ops)
        except Exception as e:  # noqa: BLE001 - any error: a disk problem is retried, anything else op by op below
            if _is_disk_problem(e):
                self._failed(e)
                return
            # a row SQLite refuses must not hold up the others: one transaction per op, drop the bad ones
            kept: list[tuple[str, Any, int]] = []
            for i, op in enumerate(ops):
                try:
                    self._transaction([op])
                except Exception as e1:
                    if _is_disk_problem(e1):
                        kept = ops[i:]
                        self._failed(e1)
                        break
                    log.exception("conversation log write failed (%s); that write is dropped", op[0])
                    with self._lock:
                        self._dropped_rows += op[0] == "begin"
                        self._dropped_feedback += op[0] == "feedback"
            self._set_held(kept)
            if not kept:
                self._recovered(len(ops))
            return
        self._set_held([])
        self._recovered(len(ops))

    def _transaction(self, ops: list[tuple[str, Any, int]]) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for kind, payload, _ in ops:
                self._apply(kind, payload)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite may have rolled back already
            raise

    def _set_held(self, ops: list[tuple[str, Any, int]]) -> None:
        with self._lock:
            self._held = collections.deque(ops)
            self._held_rows = sum(op[0] == "begin" for op in ops)
            self._held_bytes = sum(op[2] for op in ops)

    def _failed(self, e: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._write_failures += 1
            self._last_error = f"{type(e).__name__}: {e}"
            first = self._failing_since is None
            if first:
                self._failing_since = now
        self._next_attempt = now + self._backoff
        self._backoff = min(self._retry_max_s, self._backoff * 2)
        if first or now - self._last_outage_log > 60:
            self._last_outage_log = now
            log.error("conversation log cannot be written (%s): %d rows held in memory (bound %d), retrying; "
                      "the server keeps serving", self._last_error, self._held_rows, self.max_pending_rows)

    def _recovered(self, n_ops: int) -> None:
        self._backoff = self._retry_min_s
        self._next_attempt = 0.0
        with self._lock:
            since, self._failing_since = self._failing_since, None
        if since is not None:
            log.warning("conversation log writable again after %.1f s: wrote %d held writes; %d rows dropped at "
                        "the bound so far", time.monotonic() - since, n_ops, self._dropped_rows)

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
        elif kind == "interrupted":
            n = c.execute(
                "UPDATE exchanges SET status = 'interrupted', finished_at = ? WHERE status = 'in_progress'",
                (payload,),
            ).rowcount
            if n:
                log.warning("marked %d exchanges left in_progress by a previous run as interrupted", n)

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
