"""Training items from the conversation log: read-only, consistent, filtered, de-duplicated.

Owns `read_log`: one or more conversation logs (SQLite files or globs, PostgreSQL URLs), each
read in one consistent snapshot (a read transaction, or a `VACUUM INTO` copy), the source filters
(route, adapter, path kind, time window, minimum rating), the latest feedback's correction in
place of the answer, and every drop counted by reason (not `completed`, no reply, cut off, rated
too low, duplicated across replicas). `expand_paths` turns the configured patterns into targets.
"""

from __future__ import annotations

import glob
import hashlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from adapter_chat import db
from adapter_chat.chat_template import ChatTemplate, ChatTemplateError
from adapter_chat.records import ExchangeRecord
from trainer.config import SourceConfig
from trainer.items import DatasetError, Item, check_messages, first_user_message, render_chat


def expand_paths(patterns: Iterable[str | Path]) -> tuple[list[db.Target], list[str]]:
    """Expand globs, keep literal paths and PostgreSQL URLs; returns (existing files sorted, and
    URLs, in order; notes about misses)."""
    files: list[Path] = []
    urls: list[str] = []
    notes: list[str] = []
    for pattern in patterns:
        p = str(pattern)
        if db.is_url(p):
            if p not in urls:
                urls.append(p)
        elif glob.has_magic(p):
            matches = sorted(Path(m) for m in glob.glob(p))
            if not matches:
                notes.append(f"{p}: no files match")
            files.extend(matches)
        elif Path(p).exists():
            files.append(Path(p))
        else:
            notes.append(f"{p}: does not exist")
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return [*unique, *urls], notes


_EXCHANGE_COLUMNS = ExchangeRecord.COLUMNS  # what a dataset reads of an exchange (adapter_chat/records.py)


@dataclass
class LogRead:
    """What `read_log` found: items, drops by reason, files read, notes."""

    items: list[Item] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    since: float | None = None
    until: float | None = None


def _snapshot(path: Path, into_dir: Path) -> Path:
    """A consistent copy of a live WAL SQLite file made by SQLite itself (`VACUUM INTO`)."""
    into_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="snapshot-", dir=into_dir)) / path.name
    db.copy_sqlite(path, target)
    return target


def _window(source: SourceConfig, now: float) -> tuple[float | None, float | None]:
    since = source.since
    if source.window_days is not None:
        w = now - source.window_days * 86400
        since = w if since is None else max(since, w)
    return since, source.until


def read_log(
    patterns: Sequence[str | Path],
    source: SourceConfig,
    template: ChatTemplate,
    *,
    now: float | None = None,
    snapshot_dir: Path | None = None,
) -> LogRead:
    """Training items from one or more conversation logs (globs allowed).

    Exchanges appearing in several files (replicas sharing a request id) count once; feedback is
    gathered from every file (a rating may reach another replica than the answer) and the latest
    per response wins.
    """
    now = time.time() if now is None else now
    result = LogRead()
    files, notes = expand_paths(patterns)
    result.files, result.notes = files, notes
    result.since, result.until = _window(source, now)
    rows: dict[str, dict[str, Any]] = {}
    feedback: dict[str, tuple[float, int, str, int, str | None]] = {}
    for path in files:
        for kind, row in _read_one(path, source, result.since, result.until, snapshot_dir):
            if kind == "feedback":
                rid, created, fid, rating, corrected = row
                key = (created, str(path), fid)
                prev = feedback.get(rid)
                if prev is None or key > prev[:3]:
                    feedback[rid] = (*key, rating, corrected)
                continue
            existing = rows.get(row["id"])
            if existing is None:
                row["_file"] = path
                rows[row["id"]] = row
            else:
                result.dropped["duplicate request id (another replica)"] += 1
                if existing["status"] != "completed" and row["status"] == "completed":
                    row["_file"] = path
                    rows[row["id"]] = row

    seen_text: set[str] = set()
    for row in sorted(rows.values(), key=lambda r: (r["created_at"], r["id"])):
        fb = feedback.get(row["id"])
        rating, corrected = (fb[3], fb[4]) if fb else (0, None)
        origin = f"{db.describe(row['_file'])}#{row['id']}"
        if row["status"] != "completed":
            result.dropped[f"status {row['status']}"] += 1
            continue
        has_correction = bool(corrected and corrected.strip())
        # a rating judges the original answer; a correction is the answer the user wants learnt,
        # so a thumbs-down with a correction is kept (with the correction)
        if rating < source.min_rating and not has_correction:
            result.dropped[f"rating below {source.min_rating}"] += 1
            continue
        answer = corrected if has_correction else row["response"]
        if not answer or not answer.strip():
            result.dropped["no assistant reply"] += 1
            continue
        if not corrected and source.drop_length_finish and row["finish_reason"] == "length":
            result.dropped["reply cut off by max_tokens"] += 1
            continue
        try:
            raw = json.loads(row["messages"])
        except (TypeError, json.JSONDecodeError):
            result.dropped["unreadable messages column"] += 1
            continue
        if raw == []:  # a text completion (/v1/completions): raw text, not a chat to learn from
            result.dropped["text completion, not a chat"] += 1
            continue
        if row["finish_reason"] == "tool_calls" or (isinstance(raw, list) and any(
                isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in raw)):
            result.dropped["tool calling exchange (not trained on)"] += 1
            continue
        problems: list[str] = []
        msgs = check_messages(
            (raw if isinstance(raw, list) else []) + [{"role": "assistant", "content": answer}], origin, problems
        )
        if msgs is None:
            result.dropped["malformed messages"] += 1
            continue
        if source.include_system_prompt and row["system_prompt"]:
            msgs = [{"role": "system", "content": row["system_prompt"]}] + msgs
        # Only the logged answer (or its correction) is learnt: earlier assistant turns are the
        # client's history, whatever produced them.
        msgs = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in msgs[:-1]] + [msgs[-1]]
        try:
            text, prompt, final = render_chat(template, msgs)
        except ChatTemplateError:
            result.dropped["chat template failed"] += 1
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen_text:
            result.dropped["duplicate text"] += 1
            continue
        seen_text.add(digest)
        result.items.append(
            Item(
                text=text,
                key=row["conversation_id"] or first_user_message(msgs[:-1] or msgs),
                origin=origin,
                prompt=prompt,
                answer=final,
                created_at=row["created_at"],
                messages=tuple(msgs),
            )
        )
    return result


def _read_one(
    target: db.Target, source: SourceConfig, since: float | None, until: float | None, snapshot_dir: Path | None
) -> Iterable[tuple[str, Any]]:
    """Every matching exchange and all feedback of one log, read in one consistent snapshot (a
    SQLite read transaction, or a copy with `snapshot_dir`; PostgreSQL's REPEATABLE READ)."""
    name = db.describe(target)
    snap: Path | None = None
    try:
        if snapshot_dir is not None and not db.is_url(target):
            snap = _snapshot(Path(target), snapshot_dir)
        engine = db.open_engine(snap or target, readonly=True)
    except (*db.ERRORS, OSError) as e:
        raise DatasetError([f"{name}: cannot open the conversation log read-only: {e}"]) from e
    from adapter_chat.store import exchanges as x
    from adapter_chat.store import feedback as f

    q = sa.select(*(x.c[k] for k in _EXCHANGE_COLUMNS))
    for column, values in (("route", source.routes), ("adapter_name", source.adapter_names),
                           ("path_kind", source.path_kinds)):  # fmt: skip
        if values:
            q = q.where(x.c[column].in_(values))
    if since is not None:
        q = q.where(x.c.created_at >= since)
    if until is not None:
        q = q.where(x.c.created_at < until)
    try:
        with db.snapshot(engine) as c:  # one read transaction: a consistent view while servers write
            exchanges = [dict(r._mapping) for r in c.execute(q)]
            fb = [tuple(r) for r in c.execute(sa.select(f.c.response_id, f.c.created_at, f.c.id, f.c.rating,
                                                        f.c.corrected))]
    except exc.OperationalError as e:
        if db.retryable(e):
            raise DatasetError([f"{name}: cannot read the conversation log: {e.orig}"]) from e
        raise DatasetError([f"{name}: not a conversation log ({e.orig})"]) from e
    except exc.DBAPIError as e:
        raise DatasetError([f"{name}: not a conversation log ({e.orig})"]) from e
    finally:
        engine.dispose()
        if snap is not None:
            snap.unlink(missing_ok=True)
            snap.parent.rmdir()
    for r in fb:
        yield "feedback", r
    for e in exchanges:
        yield "exchange", e
