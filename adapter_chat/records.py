"""The log's records: one typed record per row shape, each with its own to-row and from-row.

Owns the shapes of what the server writes and the trainer reads (docs/conversation-log.md):

- `ExchangeStart`: the `exchanges` row as the server writes it when a request is admitted
  (status `in_progress`);
- `ExchangeEnd`: the columns the server fills when the request ends;
- `ExchangeRecord`: an `exchanges` row as the trainer reads it (the columns a dataset needs);
- `FeedbackRecord`: a `feedback` row;
- `TrainerRun`: a `trainer_runs` row as `/metrics`, `GET /v1/runs` and `trainer runs` read it.

`adapter_chat/store.py` owns the tables and the writer; this module owns only the shapes, so a
column is named in one place on each side: the Table and the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar


def _row(record: Any) -> dict[str, Any]:
    """A record's fields as a row (shallow: the JSON columns stay the objects they are)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


@dataclass(frozen=True)
class ExchangeStart:
    id: str
    created_at: float
    model: str
    route: str
    path_kind: str
    fallback_reason: str | None
    adapters: list[dict[str, Any]]  # [{"name", "version", "scale"}] (adapter_chat.identity.AdapterUse.to_log)
    adapter_name: str | None  # the first adapter's, for the index
    adapter_version: int | None
    system_prompt: str | None
    messages: list[Any]
    params: dict[str, Any]
    user: str | None
    conversation_id: str | None

    def to_row(self) -> dict[str, Any]:
        return _row(self)


@dataclass(frozen=True)
class ExchangeEnd:
    status: str  # completed, client_disconnected, error, ...
    response: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    ttft_ms: float | None
    duration_ms: float | None
    error: str | None

    def to_row(self) -> dict[str, Any]:
        return _row(self)


@dataclass(frozen=True)
class ExchangeRecord:
    """What the trainer reads of an exchange; `messages` is the column's JSON text, parsed by the
    dataset (which drops a row it cannot parse, with the reason counted)."""

    COLUMNS: ClassVar[tuple[str, ...]]
    id: str
    created_at: float
    status: str
    route: str
    path_kind: str
    adapter_name: str | None
    system_prompt: str | None
    messages: str
    response: str | None
    finish_reason: str | None
    conversation_id: str | None

    @classmethod
    def from_row(cls, row: Any) -> ExchangeRecord:
        m = row._mapping if hasattr(row, "_mapping") else row
        return cls(**{k: m[k] for k in cls.COLUMNS})


ExchangeRecord.COLUMNS = tuple(f.name for f in fields(ExchangeRecord))


@dataclass(frozen=True)
class FeedbackRecord:
    response_id: str
    created_at: float
    rating: int  # -1, 0 or 1
    corrected: str | None
    comment: str | None

    def to_row(self) -> dict[str, Any]:
        return _row(self)


@dataclass(frozen=True)
class TrainerRun:
    COLUMNS: ClassVar[tuple[str, ...]]
    id: int
    adapter: str
    started_at: float
    finished_at: float | None
    status: str  # running, published, rejected, skipped, failed, interrupted
    version: int | None
    reason: str | None
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> TrainerRun:
        """A run row; metrics that are not valid JSON read as {} (the row is written by another
        process, and one bad row must not hide the rest)."""
        m = dict(row._mapping if hasattr(row, "_mapping") else row)
        try:
            metrics = json.loads(m["metrics"]) if m.get("metrics") else {}
        except ValueError:
            metrics = {}
        return cls(m["id"], m["adapter"], m["started_at"], m["finished_at"], m["status"], m["version"],
                   m["reason"], metrics if isinstance(metrics, dict) else {})  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return _row(self)


TrainerRun.COLUMNS = tuple(f.name for f in fields(TrainerRun))
