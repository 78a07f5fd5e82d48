"""Training items from the conversation log and JSONL files, rendered as the server renders them.

This module owns turning data into training text and nothing else:

* `read_log` reads one or more conversation-log SQLite files (read-only connections, or a
  `VACUUM INTO` snapshot), applies the source filters (route, adapter, path kind, time window,
  minimum rating), uses the latest feedback's corrected answer in place of the original, and
  drops what cannot be learnt from (not `completed`, no reply, cut off, rated too low,
  duplicated across replicas), counting every drop by reason.
* `read_jsonl` reads files in one of three shapes, detected from the first record:
  completion `{"text": ...}`, pairs `{"input": ..., "output": ...}` and chat
  `{"messages": [...]}` (OpenAI shape). Every bad line is collected and reported at once in a
  `DatasetError` naming file and line.
* Chat and pair items are rendered with the base model's own chat template
  (`adapter_chat.chat_template`, sandboxed Jinja), so training text is what the server feeds the model.
* `split` sends each conversation wholly to train or validation by a hash of its key
  (conversation id, else first user message), so no conversation is in both, night after night.
* `build_dataset` puts it together and measures it (`DatasetReport`): items, token lengths with
  the base vocabulary, items longer than the training window, drops by reason.
"""

from __future__ import annotations

import glob
import hashlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from adapter_chat import db
from adapter_chat.chat_template import ChatTemplate, ChatTemplateError
from adapter_chat.records import ExchangeRecord
from trainer.config import AdapterConfig, SourceConfig, TrainerConfig

TokenCounter = Callable[[str], int]
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_REPORTED_PROBLEMS = 50


class DatasetError(ValueError):
    """Input data is unusable. `problems` holds one `file:line: what` string per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        text = f"{len(self.problems)} problem(s) in the training data:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


@dataclass(frozen=True)
class Item:
    """One training example: the full rendered text plus what the split and evaluation need."""

    text: str
    """The text the model is trained on (template-rendered for chat and pairs)."""
    key: str
    """What the train/validation split hashes: conversation id, or the first user message."""
    origin: str
    """Where it came from: `file:line` for JSONL, `file#exchange-id` for the log."""
    prompt: str | None = None
    """The rendered prompt up to the final answer (add_generation_prompt=True), for samples."""
    answer: str | None = None
    """The final assistant answer, for samples."""
    created_at: float | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    """The conversation (chat and pair items): what the trainer tokenizes, with a loss on the
    assistant turns whose `weight` is not 0. None for completion items (plain `text`)."""


# ---------------------------------------------------------------------------------------------
# Rendering


def flatten_content(content: Any) -> str | None:
    """OpenAI content (a string, or a list of parts) as plain text; None when unusable."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            else:
                return None
        return "".join(parts)
    return None


def first_user_message(messages: Sequence[dict[str, str]]) -> str:
    for m in messages:
        if m.get("role") == "user":
            return m.get("content", "")
    return messages[0].get("content", "") if messages else ""


def render_chat(template: ChatTemplate, messages: list[dict[str, str]]) -> tuple[str, str, str]:
    """(full text, prompt up to the last answer, last answer) for a conversation ending with the
    assistant. The full text is the template's rendering without a generation prompt."""
    text = template.render(messages, add_generation_prompt=False)
    prompt = template.render(messages[:-1], add_generation_prompt=True)
    return text, prompt, messages[-1]["content"]


# ---------------------------------------------------------------------------------------------
# JSONL


def _check_messages(raw: Any, where: str, problems: list[str]) -> list[dict[str, str]] | None:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: 'messages' must be a non-empty list")
        return None
    out: list[dict[str, str]] = []
    ok = True
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            problems.append(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            ok = False
            continue
        role = m.get("role")
        content = flatten_content(m.get("content"))
        if role not in ROLES:
            problems.append(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
            ok = False
        if content is None:
            problems.append(f"{where}: messages[{i}].content must be a string or a list of text parts")
            ok = False
        weight = m.get("weight", 1)
        if "weight" in m and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
            problems.append(f"{where}: messages[{i}].weight must be 0 or 1, and only on assistant messages")
            ok = False
        if ok:
            out.append({"role": role, "content": content} | ({"weight": weight} if "weight" in m else {}))
    if not ok:
        return None
    if out[-1]["role"] != "assistant":
        problems.append(f"{where}: the last message must be the assistant's answer (got role {out[-1]['role']!r})")
        return None
    if not out[-1]["content"].strip():
        problems.append(f"{where}: the assistant's answer is empty")
        return None
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        problems.append(f"{where}: every assistant message has weight 0, so there is nothing to learn")
        return None
    return out


SHAPES = {
    "completion": ("text",),
    "pairs": ("input", "output"),
    "chat": ("messages",),
}


def detect_shape(record: Any) -> str | None:
    """The shape of a record: 'chat', 'pairs' or 'completion', or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "input" in record and "output" in record:
        return "pairs"
    if "text" in record:
        return "completion"
    return None


def read_jsonl(path: Path, template: ChatTemplate | None) -> tuple[list[Item], str | None]:
    """Items of one JSONL file and its shape. Raises one DatasetError listing every bad line.

    Optional per-record keys: `conversation_id` (split key), `system` (pairs: a system message).
    """
    problems: list[str] = []
    items: list[Item] = []
    shape: str | None = None
    first_line = 0
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise DatasetError([f"{path}: cannot open: {exc.strerror or exc}"]) from exc
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            got = detect_shape(record)
            if shape is None:
                if got is None:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    problems.append(
                        f"{where}: cannot tell the shape from the first record (keys {keys}); expected "
                        '{"text": ...}, {"input": ..., "output": ...} or {"messages": [...]}'
                    )
                    continue
                shape, first_line = got, lineno
            elif got != shape:
                problems.append(
                    f"{where}: expected the {shape} shape {SHAPES[shape]} like line {first_line}, got "
                    f"{sorted(record) if isinstance(record, dict) else type(record).__name__}"
                )
                continue
            item = _jsonl_item(shape, record, where, template, problems)
            if item is not None:
                items.append(item)
    if problems:
        raise DatasetError(problems)
    return items, shape


def _jsonl_item(
    shape: str, record: dict[str, Any], where: str, template: ChatTemplate | None, problems: list[str]
) -> Item | None:
    conv = record.get("conversation_id")
    if conv is not None and not isinstance(conv, str):
        problems.append(f"{where}: 'conversation_id' must be a string")
        return None
    if shape == "completion":
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: 'text' must be a non-empty string")
            return None
        return Item(text=text, key=conv or text, origin=where)
    if shape == "pairs":
        inp, out, system = record["input"], record["output"], record.get("system")
        bad = [k for k, v in (("input", inp), ("output", out)) if not isinstance(v, str) or not v.strip()]
        if system is not None and not isinstance(system, str):
            bad.append("system")
        if bad:
            problems.append(f"{where}: {', '.join(repr(b) for b in bad)} must be non-empty string(s)")
            return None
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": inp},
            {"role": "assistant", "content": out},
        ]
    else:
        messages = _check_messages(record["messages"], where, problems)
        if messages is None:
            return None
    assert template is not None, "chat and pair items need the base model's chat template"
    try:
        text, prompt, answer = render_chat(template, messages)
    except ChatTemplateError as exc:
        problems.append(f"{where}: {exc}")
        return None
    return Item(
        text=text, key=conv or first_user_message(messages), origin=where, prompt=prompt, answer=answer,
        messages=tuple(messages),
    )


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


# ---------------------------------------------------------------------------------------------
# The conversation log

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
        msgs = _check_messages(
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


# ---------------------------------------------------------------------------------------------
# Split


def split_fraction(key: str) -> float:
    """A stable number in [0, 1) for a split key (the same on every machine and every night)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split(items: Sequence[Item], val_fraction: float) -> tuple[list[Item], list[Item]]:
    """(train, validation): every item with the same key lands on the same side."""
    train, val = [], []
    for item in items:
        (val if split_fraction(item.key) < val_fraction else train).append(item)
    return train, val


# ---------------------------------------------------------------------------------------------
# Tokens and the report


def VocabTokenizer(model_path: Path) -> TokenCounter:  # noqa: N802 (reads as the class it returns)
    """The base model's own token counter (trainer.llama_opt owns llama.cpp; imported lazily so
    reading logs and configs never loads it)."""
    from trainer.llama_opt import VocabTokenizer as _VocabTokenizer

    return _VocabTokenizer(model_path)


def _percentile(sorted_values: Sequence[int], q: float) -> int:
    if not sorted_values:
        return 0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return int(sorted_values[idx])


@dataclass
class DatasetReport:
    """What a dataset holds and what was left out, in numbers a person can act on."""

    items: int = 0
    train_items: int = 0
    val_items: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    n_ctx: int = 0
    tokens_total: int = 0
    tokens_min: int = 0
    tokens_p50: int = 0
    tokens_p90: int = 0
    tokens_p99: int = 0
    tokens_max: int = 0
    over_ctx: int = 0
    """Items longer than the training window. Training cuts one token stream into windows, so
    the part past `n_ctx` lands in the next window and is learnt without the item's start
    (its system prompt and question): a sign `n_ctx` is too small."""
    tokens_past_ctx: int = 0
    capped: dict[str, int] = field(default_factory=dict)
    """Usable items left out by `max_items` / `max_val_items` (oldest first)."""
    histogram: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    since: float | None = None
    until: float | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def format(self) -> str:
        lines = [
            f"items: {self.items} (train {self.train_items}, validation {self.val_items})",
            "sources: " + (", ".join(f"{k} {v}" for k, v in self.sources.items()) or "none"),
            f"tokens per item: min {self.tokens_min}, median {self.tokens_p50}, p90 {self.tokens_p90}, "
            f"p99 {self.tokens_p99}, max {self.tokens_max}; total {self.tokens_total}",
            f"longer than the training window ({self.n_ctx} tokens): {self.over_ctx} item(s); "
            f"{self.tokens_past_ctx} token(s) past the window are learnt without their item's start",
        ]
        if self.histogram:
            width = max(self.histogram.values()) or 1
            lines.append("length histogram (tokens):")
            for label, count in self.histogram.items():
                lines.append(f"  {label:>11} {count:6d} {'#' * max(1 if count else 0, round(30 * count / width))}")
        for what, count in self.capped.items():
            lines.append(f"left out by {what}: {count} (the oldest)")
        total_dropped = sum(self.dropped.values())
        lines.append(f"dropped: {total_dropped}")
        for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {count:6d}  {reason}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def measure(items: Sequence[Item], count_tokens: TokenCounter, n_ctx: int) -> DatasetReport:
    """Token statistics of `items` against a training window of `n_ctx` tokens."""
    lengths = sorted(count_tokens(i.text) for i in items)
    report = DatasetReport(items=len(items), n_ctx=n_ctx)
    if not lengths:
        return report
    report.tokens_total = sum(lengths)
    report.tokens_min, report.tokens_max = lengths[0], lengths[-1]
    report.tokens_p50 = _percentile(lengths, 0.5)
    report.tokens_p90 = _percentile(lengths, 0.9)
    report.tokens_p99 = _percentile(lengths, 0.99)
    report.over_ctx = sum(1 for n in lengths if n > n_ctx)
    report.tokens_past_ctx = sum(n - n_ctx for n in lengths if n > n_ctx)
    edges = sorted({n_ctx // 4, n_ctx // 2, (3 * n_ctx) // 4, n_ctx, 2 * n_ctx})
    lo = 0
    for hi in edges:
        report.histogram[f"{lo + 1}-{hi}"] = sum(1 for n in lengths if lo < n <= hi)
        lo = hi
    report.histogram[f">{lo}"] = sum(1 for n in lengths if n > lo)
    return report


# ---------------------------------------------------------------------------------------------
# Putting it together


@dataclass
class Dataset:
    """Train and validation items for one adapter, with the report that describes them."""

    train: list[Item]
    val: list[Item]
    report: DatasetReport

    @property
    def fingerprint(self) -> str:
        """sha256 over the training and validation texts and their messages' weights: equal
        data, equal fingerprint."""
        h = hashlib.sha256()
        for part, items in (("train", self.train), ("val", self.val)):
            h.update(part.encode())
            for item in items:
                h.update(hashlib.sha256(item.text.encode()).digest())
                if item.messages is not None:  # per-message weights change what is learnt
                    weights = [m.get("weight", 1) for m in item.messages]
                    h.update(json.dumps(weights).encode())
        return h.hexdigest()


def _newest(items: list[Item], cap: int | None, what: str, capped: dict[str, int]) -> list[Item]:
    """At most `cap` items, keeping the newest (log items carry timestamps; file items count as
    older than any log item, in file order)."""
    if cap is None or len(items) <= cap:
        return items
    order = sorted(range(len(items)), key=lambda i: (items[i].created_at or 0.0, i))
    keep = set(order[-cap:])
    capped[what] = len(items) - cap
    return [it for i, it in enumerate(items) if i in keep]


def load_template(base_model: Path) -> ChatTemplate:
    """The base model's chat template from its GGUF metadata (ChatML when it carries none)."""
    from adapter_chat.gguf_info import BaseModelInfo

    return ChatTemplate.from_model(BaseModelInfo.load(base_model, sha256="-"))


def build_dataset(
    cfg: TrainerConfig,
    adapter: AdapterConfig,
    *,
    template: ChatTemplate | None = None,
    count_tokens: TokenCounter | None = None,
    now: float | None = None,
) -> Dataset:
    """Read every configured source of `adapter`, de-duplicate, split and measure."""
    template = template if template is not None else load_template(cfg.base_model)
    source = adapter.source
    items: list[Item] = []
    dropped: Counter[str] = Counter()
    sources: dict[str, int] = {}
    notes: list[str] = []
    since = until = None
    if source.use_logs and cfg.logs:
        snap_dir = cfg.cache_dir / "snapshots" if cfg.snapshot else None
        got = read_log(cfg.logs, source, template, now=now, snapshot_dir=snap_dir)
        items.extend(got.items)
        dropped.update(got.dropped)
        notes.extend(got.notes)
        sources[f"conversation log ({len(got.files)} file(s))"] = len(got.items)
        since, until = got.since, got.until
    files, missing = expand_paths(source.jsonl)
    problems = [f"{m} (listed under jsonl)" for m in missing]
    for path in files:
        try:
            file_items, shape = read_jsonl(path, template)
        except DatasetError as exc:
            problems.extend(exc.problems)
            continue
        items.extend(file_items)
        sources[f"{path} ({shape or 'empty'})"] = len(file_items)
    if problems:
        raise DatasetError(problems)

    unique: list[Item] = []
    seen: set[str] = set()
    for item in items:
        digest = hashlib.sha256(item.text.encode()).hexdigest()
        if digest in seen:
            dropped["duplicate text"] += 1
            continue
        seen.add(digest)
        unique.append(item)

    train, val = split(unique, adapter.train.val_fraction)
    capped: dict[str, int] = {}
    train = _newest(train, adapter.train.max_items, "max_items", capped)
    val = _newest(val, adapter.train.max_val_items, "max_val_items", capped)

    counter = count_tokens if count_tokens is not None else VocabTokenizer(cfg.base_model)
    report = measure(train + val, counter, adapter.train.n_ctx)
    report.train_items, report.val_items = len(train), len(val)
    report.sources = sources
    report.dropped = dict(dropped)
    report.capped = capped
    report.notes = notes
    report.since, report.until = since, until
    return Dataset(train=train, val=val, report=report)
