"""What the bare served base gave for a request, kept between nightlies.

Owns one SQLite file (``<cache_dir>/base-results.sqlite3``) that maps a request to the bare
base model's result for it. A request is either one validation item's scored targets (the summed
negative log-likelihood and the target count) or one held-out prompt's greedy answer. Every
nightly compares the adapter with the base on the same items. The base does not change from one
night to the next, so after the first night the evaluation scores only the adapter, plus the base
on items that are new since. lm-evaluation-harness's ``--use_cache`` keeps model responses the
same way, keyed by the request.

A key is the sha256 of four things:

- the base file's sha256;
- the llama.cpp build (``adapter_chat.llama_model.native_build_id``: another build may round
  differently);
- the kind of result;
- the request as canonical JSON (token ids, target mask, limits).

A new base file, a rebuilt wheel or another tokenization therefore makes new keys, and nothing
stale is read. Rows unused for ``keep_days`` are deleted when the cache opens. Deleting the file
recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILENAME = "base-results.sqlite3"
SCHEMA = """CREATE TABLE IF NOT EXISTS base_results (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at REAL NOT NULL,
    used_at REAL NOT NULL
)"""


class BaseCache:
    """Results of one base model on one llama.cpp build, by request. ``hits`` and ``misses``
    count lookups since it opened."""

    def __init__(
        self,
        path: Path,
        *,
        base_sha256: str,
        build: str,
        keep_days: float = 30.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._scope = f"{base_sha256}:{build}"
        self._now = now
        self.hits = self.misses = 0
        self._db = sqlite3.connect(self.path)
        with self._db:
            self._db.execute(SCHEMA)
            self._db.execute("DELETE FROM base_results WHERE used_at < ?", (now() - keep_days * 86400,))

    def _key(self, kind: str, request: Any) -> str:
        text = json.dumps([self._scope, kind, request], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, kind: str, request: Any) -> Any | None:
        """The stored result for ``request`` (JSON-shaped), or None."""
        key = self._key(kind, request)
        row = self._db.execute("SELECT value FROM base_results WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        with self._db:
            self._db.execute("UPDATE base_results SET used_at = ? WHERE key = ?", (self._now(), key))
        return json.loads(row[0])

    def put(self, kind: str, request: Any, value: Any) -> None:
        """Store ``value`` (JSON-serializable) as the result of ``request``."""
        t = self._now()
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO base_results (key, kind, value, created_at, used_at) VALUES (?, ?, ?, ?, ?)",
                (self._key(kind, request), kind, json.dumps(value), t, t),
            )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM base_results").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> BaseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["FILENAME", "BaseCache"]
