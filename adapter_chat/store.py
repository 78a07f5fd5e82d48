"""The conversation log: its tables, migrations, the server's single writer, and trainer-run records.

Owns docs/conversation-log.md. One code path for SQLite (the embedded default) and PostgreSQL (one
log shared by replicas on several nodes): SQLAlchemy Core tables and statements here, the few
differences between the two databases in adapter_chat/db.py. Migrations are ordered functions
`m001_...`; `migrate(engine)` applies the missing ones and is safe to re-run. The server writes
through `ConversationLog`, one thread fed by a queue, so the event loop never waits on the
database. The trainer uses `open_db` and the trainer-run helpers.

Over the ~400-line guide on purpose: the tables, their migrations and the one writer change
together (a column is added in all three at once), so they stay in one file.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine

from adapter_chat import db
from adapter_chat.records import ExchangeEnd, ExchangeStart, FeedbackRecord, TrainerRun

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Tables (the current schema, used by every statement) and migrations

metadata = sa.MetaData()

exchanges = sa.Table(
    "exchanges", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("route", sa.Text, nullable=False),
    sa.Column("path_kind", sa.Text, nullable=False),
    sa.Column("fallback_reason", sa.Text),
    sa.Column("adapters", sa.Text, nullable=False, server_default="[]"),
    sa.Column("adapter_name", sa.Text),
    sa.Column("adapter_version", sa.Integer),
    sa.Column("system_prompt", sa.Text),
    sa.Column("messages", sa.Text, nullable=False),
    sa.Column("response", sa.Text),
    sa.Column("finish_reason", sa.Text),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("cached_tokens", sa.Integer),
    sa.Column("ttft_ms", sa.Float),
    sa.Column("duration_ms", sa.Float),
    sa.Column("params", sa.Text, nullable=False, server_default="{}"),
    sa.Column("user", sa.Text),
    sa.Column("conversation_id", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("replica", sa.Text),
    sa.Index("exchanges_created", "created_at"),
    sa.Index("exchanges_route", "route", "created_at"),
    sa.Index("exchanges_adapter", "adapter_name", "created_at"),
    sa.Index("exchanges_conversation", "conversation_id"),
)  # fmt: skip

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("response_id", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("rating", sa.Integer, sa.CheckConstraint("rating IN (-1, 0, 1)"), nullable=False),
    sa.Column("corrected", sa.Text),
    sa.Column("comment", sa.Text),
    sa.Index("feedback_response", "response_id"),
)  # fmt: skip

trainer_runs = sa.Table(
    "trainer_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("adapter", sa.Text, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("version", sa.Integer),
    sa.Column("reason", sa.Text),
    sa.Column("metrics", sa.Text),
    sa.Index("trainer_runs_adapter", "adapter", "started_at"),
)  # fmt: skip

schema_migrations = sa.Table(
    "schema_migrations", sa.MetaData(),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("applied_at", sa.Float, nullable=False),
)  # fmt: skip

# A migration creates or changes tables with Core DDL, so it runs on both databases. A later
# change to a table adds a migration (an ALTER) and updates the Table above.


# Registered in definition order by the decorator (simonw/llm's pattern), so a migration written
# below cannot be left out of the list; each one's name is what `schema_migrations` records.
MIGRATIONS: list[Callable[[Connection], None]] = []


def migration(fn: Callable[[Connection], None]) -> Callable[[Connection], None]:
    if any(m.__name__ == fn.__name__ for m in MIGRATIONS):
        raise ValueError(f"migration {fn.__name__} is defined twice")
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(conn: Connection) -> None:
    metadata.create_all(conn, tables=[exchanges, feedback])


@migration
def m002_trainer_runs(conn: Connection) -> None:
    metadata.create_all(conn, tables=[trainer_runs])


def migrate(engine: Engine) -> list[str]:
    """Apply missing migrations in order, in one transaction; return the names applied. Safe to
    re-run, and safe when several processes start at once (db.migration_lock)."""
    with engine.begin() as conn:
        db.migration_lock(conn)
        schema_migrations.create(conn, checkfirst=True)
        done = set(conn.execute(sa.select(schema_migrations.c.name)).scalars())
        applied = []
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            fn(conn)
            conn.execute(schema_migrations.insert().values(name=fn.__name__, applied_at=time.time()))
            applied.append(fn.__name__)
    return applied


def open_db(target: db.Target, *, readonly: bool = False) -> Engine:
    """An engine on the log at `target` (a SQLite path or a PostgreSQL URL: adapter_chat/db.py), with the
    current schema unless `readonly`. The caller disposes of it."""
    engine = db.open_engine(target, readonly=readonly)
    if not readonly:
        try:
            migrate(engine)
        except exc.DBAPIError as e:
            engine.dispose()
            # at start-up a wrong URL, password or path fails fast, with the database named (its
            # password masked); an outage after start is held and retried by ConversationLog
            raise LogUnavailable(f"cannot open the conversation log {db.describe(target)}: {e.orig}") from e
        except BaseException:
            engine.dispose()
            raise
    return engine


class LogUnavailable(RuntimeError):
    """The log's database cannot be opened or migrated (at start-up)."""


# ---------------------------------------------------------------------------------------------
# Trainer runs (used by the trainer; read by the server's metrics and GET /v1/runs)


def start_trainer_run(engine: Engine, adapter: str) -> int:
    with engine.begin() as c:
        result = c.execute(trainer_runs.insert().values(adapter=adapter, started_at=time.time(), status="running"))
        return int(result.inserted_primary_key[0])


def finish_trainer_run(
    engine: Engine,
    run_id: int,
    *,
    status: str,
    version: int | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    with engine.begin() as c:
        c.execute(
            trainer_runs.update().where(trainer_runs.c.id == run_id).values(
                finished_at=time.time(), status=status, version=version, reason=db.text(reason),
                metrics=json.dumps(metrics or {}),
            )
        )  # fmt: skip


def _runs(engine: Engine, query: sa.Select) -> list[TrainerRun]:
    """Run rows as records (`TrainerRun.from_row`); [] for a log older than the trainer_runs migration."""
    try:
        with engine.connect() as c:
            rows = c.execute(query).fetchall()
    except exc.DBAPIError as e:
        text = str(e.orig).lower()
        if "no such table" in text or "does not exist" in text:
            return []
        raise
    return [TrainerRun.from_row(row) for row in rows]


def last_trainer_runs(engine: Engine) -> list[TrainerRun]:
    """The latest run per adapter."""
    t = trainer_runs
    newest = sa.select(sa.func.max(t.c.id)).group_by(t.c.adapter).scalar_subquery()
    cols = [t.c[k] for k in TrainerRun.COLUMNS]
    return _runs(engine, sa.select(*cols).where(t.c.id.in_(newest)).order_by(t.c.adapter))


def recent_trainer_runs(engine: Engine, *, limit: int = 20, adapter: str | None = None) -> list[TrainerRun]:
    """The newest `limit` runs, newest first, optionally of one adapter (read by GET /v1/runs)."""
    t = trainer_runs
    q = sa.select(*(t.c[k] for k in TrainerRun.COLUMNS)).order_by(t.c.id.desc()).limit(limit)
    return _runs(engine, q if adapter is None else q.where(t.c.adapter == adapter))


def read_trainer_runs(target: db.Target, *, limit: int = 20, adapter: str | None = None,
                      latest: bool = False) -> list[TrainerRun]:
    """The runs of the log at `target`, read-only: `recent_trainer_runs`, or with `latest` the
    latest run per adapter (`last_trainer_runs`); [] when there is no log yet."""
    if not db.exists(target):
        return []
    engine = db.open_engine(target, readonly=True)
    try:
        return last_trainer_runs(engine) if latest else recent_trainer_runs(engine, limit=limit, adapter=adapter)
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# The server's writer

EXCHANGE_COLUMNS = tuple(exchanges.c.keys())
JSON_COLUMNS = {"adapters", "messages", "params"}


def _utf8(v: Any) -> Any:
    """Lone surrogates (valid in JSON "\ud800", not in UTF-8) become U+FFFD, as the tokenizer sees them."""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return v


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: db.text(_utf8(json.dumps(v, ensure_ascii=False) if k in JSON_COLUMNS else v)) for k, v in row.items()}


def _size(payload: Any) -> int:
    """Rough bytes held in memory for one queued write (the text it carries)."""
    if isinstance(payload, dict):
        return 64 + sum(len(v) if isinstance(v, str) else 8 for v in payload.values())
    if isinstance(payload, (tuple, list)):
        return sum(_size(v) if isinstance(v, (dict, tuple, list)) else len(v) if isinstance(v, str) else 8
                   for v in payload)
    return 8


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
        target: db.Target,
        *,
        replica: str | None = None,
        retention_days: float = 0,
        max_pending_rows: int = 10_000,
        max_pending_bytes: int = 64 << 20,
        retry_min_s: float = 0.25,
        retry_max_s: float = 5.0,
    ) -> None:
        self._replica = replica
        self._retention_s = retention_days * 86400
        self.max_pending_rows = max_pending_rows
        self.max_pending_bytes = max_pending_bytes
        self._retry_min_s, self._retry_max_s = retry_min_s, retry_max_s
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._engine = open_db(target)
        # reads (exchange_route) run on the caller's thread: SQLite opens the file read-only per
        # read; PostgreSQL borrows a connection from the writer's pool
        self._reader = self._engine if db.is_shared(self._engine) else db.open_engine(target, readonly=True)
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

    def begin(self, row: ExchangeStart | dict[str, Any]) -> None:
        """Queue the `in_progress` row of an admitted request (a dict of the same columns is
        accepted for fixtures that leave some out)."""
        row = {**(row.to_row() if isinstance(row, ExchangeStart) else row), "status": "in_progress",
               "replica": self._replica}  # fmt: skip
        self._queue.put(("begin", _encode(row)))

    def finish(self, exchange_id: str, end: ExchangeEnd | dict[str, Any]) -> None:
        """Queue the columns a request fills when it ends (or a dict of some of them)."""
        fields = end.to_row() if isinstance(end, ExchangeEnd) else end
        self._queue.put(("finish", (exchange_id, _encode({**fields, "finished_at": time.time()}))))

    def add_feedback(self, response_id: str, rating: int, corrected: str | None, comment: str | None) -> None:
        fb = FeedbackRecord(db.text(response_id), time.time(), rating, db.text(_utf8(corrected)), db.text(_utf8(comment)))
        self._queue.put(("feedback", fb.to_row()))

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
        self._engine.dispose()
        self._reader.dispose()

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

    def exchange_route(self, exchange_id: str) -> tuple[str, str] | None:
        """(route, path_kind) of a logged exchange, or None; read on the caller's thread."""
        with self._reader.connect() as c:
            row = c.execute(
                sa.select(exchanges.c.route, exchanges.c.path_kind).where(exchanges.c.id == db.text(exchange_id))
            ).first()
        return (row[0], row[1]) if row else None

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
            if db.retryable(e):
                self._failed(e)
                return
            # a row SQLite refuses must not hold up the others: one transaction per op, drop the bad ones
            kept: list[tuple[str, Any, int]] = []
            for i, op in enumerate(ops):
                try:
                    self._transaction([op])
                except Exception as e1:
                    if db.retryable(e1):
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
        with self._engine.begin() as c:  # rolled back on any error
            for kind, payload, _ in ops:
                self._apply(c, kind, payload)

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

    def _apply(self, c: Connection, kind: str, payload: Any) -> None:
        if kind == "begin":
            db.upsert(c, exchanges, {k: payload[k] for k in EXCHANGE_COLUMNS if k in payload})
        elif kind == "finish":
            exchange_id, fields = payload
            c.execute(exchanges.update().where(exchanges.c.id == exchange_id)
                      .values({k: fields[k] for k in EXCHANGE_COLUMNS if k in fields and k != "id"}))
        elif kind == "feedback":
            c.execute(feedback.insert().values(payload))
        elif kind == "interrupted":
            # rows this server left in_progress when it died; a shared database holds other
            # replicas' live rows too, so there only this replica's
            left = exchanges.c.status == "in_progress"
            if db.is_shared(self._engine):
                left &= exchanges.c.replica == self._replica if self._replica else exchanges.c.replica.is_(None)
            n = c.execute(exchanges.update().where(left).values(status="interrupted", finished_at=payload)).rowcount
            if n:
                log.warning("marked %d exchanges left in_progress by a previous run as interrupted", n)

    def _apply_retention(self) -> None:
        self._last_retention = time.monotonic()
        if self._retention_s <= 0:
            return
        cutoff = time.time() - self._retention_s
        try:
            with self._engine.begin() as c:
                n = c.execute(exchanges.delete().where(exchanges.c.created_at < cutoff)).rowcount
                c.execute(feedback.delete().where(feedback.c.created_at < cutoff))
            if n:
                log.info("retention: deleted %d exchanges older than the retention window", n)
        except exc.SQLAlchemyError:
            log.exception("retention delete failed")
