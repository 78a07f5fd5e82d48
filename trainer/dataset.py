"""Training items from the conversation log and JSONL files, rendered as the server renders them.

This module owns turning data into training text and nothing else:

* `read_log` (in `trainer/log_source.py`) reads one or more conversation logs read-only, applies
  the source filters, uses the latest feedback's corrected answer in place of the original, and
  counts every drop by reason. `trainer/items.py` holds the `Item` both readers return.
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

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from adapter_chat.chat_template import ChatTemplate, ChatTemplateError
from trainer.config import AdapterConfig, TrainerConfig
from trainer.items import DatasetError, Item, check_messages, first_user_message, render_chat
from trainer.log_source import expand_paths, read_log

TokenCounter = Callable[[str], int]


# ---------------------------------------------------------------------------------------------
# JSONL


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
        messages = check_messages(record["messages"], where, problems)
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
