"""Database connections for the conversation log: SQLite or PostgreSQL behind one SQLAlchemy engine.

Everything that differs between the two databases lives here, and only here:

- opening: a file path is SQLite (WAL, `synchronous = FULL`, a 5 s busy timeout, created with mode
  0600); a `postgresql://` URL is PostgreSQL through psycopg 3, with a pre-pinged pool so a
  restarted server is reconnected to on the next write;
- transactions: SQLite writers take the write lock up front (`BEGIN IMMEDIATE`), readers see one
  snapshot (`BEGIN`); PostgreSQL readers that need one use REPEATABLE READ (`snapshot`);
- the insert-or-replace of an exchange row (`upsert`);
- which errors a later retry can cure (`retryable`): a full disk or a database that cannot be
  reached, as opposed to a row the database refuses;
- text PostgreSQL cannot store (NUL) is replaced, on both, so both hold the same records (`text`);
- serialising migrations between processes that start at the same time (`migration_lock`);
- whether other replicas write the same log (`is_shared`).

The statements themselves are SQLAlchemy Core, shared by both (adapter_chat/store.py).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc, pool
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

Target = str | Path
"""Where a log lives: a SQLite file path, or a `postgresql://user:password@host:port/db` URL."""

ERRORS: tuple[type[Exception], ...] = (exc.SQLAlchemyError, sqlite3.Error)
"""What a database operation can raise (SQLAlchemy's errors, and sqlite3's from copy_sqlite)."""

_PG_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def is_url(target: Target) -> bool:
    """True for a PostgreSQL URL (anything else is a SQLite file path)."""
    return isinstance(target, str) and target.startswith(_PG_SCHEMES)


def describe(target: Target) -> str:
    """The target for logs and messages, with any password masked."""
    if is_url(target):
        return sa.make_url(_pg_url(str(target))).render_as_string(hide_password=True)
    return str(target)


def exists(target: Target) -> bool:
    """Whether there is a log to read: a SQLite file on disk; a URL is always worth a try."""
    return is_url(target) or Path(target).is_file()


def _pg_url(url: str) -> str:
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def open_engine(target: Target, *, readonly: bool = False) -> Engine:
    """An engine for `target`. A SQLite file is created (mode 0600) unless `readonly`; a read-only
    SQLite engine refuses every write. PostgreSQL engines share one pool per engine."""
    if is_url(target):
        engine = sa.create_engine(
            _pg_url(str(target)), pool_pre_ping=True, pool_size=2, max_overflow=4, pool_timeout=10,
            connect_args={"connect_timeout": 5, "application_name": "adapter-chat"},
            # read-only engines still write nothing: every transaction is READ ONLY
            execution_options={"postgresql_readonly": True} if readonly else {},
        )  # fmt: skip
        return engine
    path = Path(target)
    if not readonly:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)

    def creator() -> sqlite3.Connection:
        # isolation_level=None: SQLAlchemy's begin event below issues BEGIN itself (the pysqlite
        # recipe in SQLAlchemy's SQLite dialect docs, "Serializable isolation / Savepoints")
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
        else:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    engine = sa.create_engine(
        "sqlite+pysqlite://", creator=creator,
        # a writer keeps its one connection; readers open the file per use, as sqlite3 would
        poolclass=pool.NullPool if readonly else pool.SingletonThreadPool,
    )  # fmt: skip

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """One read transaction that sees a single consistent state while servers write: SQLite's
    read transaction in WAL mode, PostgreSQL's REPEATABLE READ."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as c:
            c = c.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with c.begin():
                yield c
        return
    with engine.begin() as c:
        yield c


def is_shared(engine: Engine) -> bool:
    """A PostgreSQL log is shared by every replica; a SQLite file belongs to one server."""
    return engine.dialect.name == "postgresql"


def copy_sqlite(path: Path, into: Path) -> None:
    """A consistent copy of a live SQLite file, made by SQLite itself (`VACUUM INTO`, which cannot
    run inside the transaction SQLAlchemy would open)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("VACUUM INTO ?", (str(into),))
    finally:
        conn.close()


def migration_lock(conn: Connection) -> None:
    """Inside a migration's transaction: wait for any other process migrating the same database.
    SQLite's BEGIN IMMEDIATE already serialises writers; PostgreSQL takes a transaction-scoped
    advisory lock (released at COMMIT)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7245873)"))  # an arbitrary key of ours


def upsert(conn: Connection, table: sa.Table, row: dict[str, Any], key: str = "id") -> None:
    """Insert `row`, replacing the row with the same `key` (SQLite's INSERT OR REPLACE)."""
    insert = pg_dialect.insert if conn.dialect.name == "postgresql" else sqlite_dialect.insert
    stmt = insert(table).values(**row)
    stmt = stmt.on_conflict_do_update(index_elements=[key], set_={k: stmt.excluded[k] for k in row if k != key})
    conn.execute(stmt)


def text(v: Any) -> Any:
    """A value as both databases store it: NUL (which PostgreSQL's text type refuses) becomes U+FFFD,
    as lone surrogates do (store._utf8)."""
    return v.replace("\x00", "\ufffd") if isinstance(v, str) else v


_SQLITE_RETRYABLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_BUSY", "SQLITE_LOCKED",
                     "SQLITE_READONLY", "SQLITE_PROTOCOL", "SQLITE_NOTADB")  # fmt: skip
_SQLITE_RETRYABLE_TEXT = ("disk is full", "disk i/o error", "unable to open", "database is locked", "readonly database")
# PostgreSQL SQLSTATE classes a retry can cure: 08 connection, 53 insufficient resources (disk full,
# out of memory, too many connections), 57 operator intervention (shutdown, cannot connect now),
# 58 system error (I/O), 40 transaction rollback (serialization failure, deadlock), HV/XX none
_PG_RETRYABLE_CLASSES = ("08", "53", "57", "58", "40")


def retryable(e: BaseException) -> bool:
    """Errors a later retry can cure: a full disk, an I/O error, a locked or unreachable database.
    Anything else (a value the database refuses) is a problem of the row itself."""
    if isinstance(e, exc.DBAPIError):
        if e.connection_invalidated:
            return True
        e = e.orig if e.orig is not None else e
    elif isinstance(e, exc.TimeoutError):  # no pooled connection free: the database is not answering
        return True
    if isinstance(e, sqlite3.Error):
        name = getattr(e, "sqlite_errorname", "") or ""  # Python 3.11+
        return name.startswith(_SQLITE_RETRYABLE) or any(m in str(e).lower() for m in _SQLITE_RETRYABLE_TEXT)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    if isinstance(e, psycopg.Error):
        state = getattr(e, "sqlstate", None)
        if state is None:  # raised by the client: no connection, connection lost
            return isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError))
        return state[:2] in _PG_RETRYABLE_CLASSES
    return False
