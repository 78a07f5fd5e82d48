"""Training examples as token ids with a loss mask, packed into fixed-size windows.

Owns: turning dataset items into ``TokenizedConversation``s with the one tokenization the server
uses (``adapter_chat.chat_template.tokenize_conversation``), and packing them into windows of
``n_ctx`` inputs and ``n_ctx`` labels, where a label is the next token when that token is a
training target and ``IGNORE_INDEX`` otherwise (the prompt, the system prompt, the chat markup,
padding, and the first token of the next item in the window).

Optionally (``[train] unlikelihood``), ``repeat_negatives`` picks unlikelihood targets: where an
answer's line starts to differ from an earlier line of the same answer, the earlier line's token
there is a negative (the token a model copying that line would emit). Training then pushes its
probability down where the data shows the answer moving on, the repetition a small model falls
into when it is decoded greedily.

Packing is first-fit in the given order: an item that fits in a window is never split, so an
answer is learnt with its prompt in view. Each item in a window is its own sequence
(``Window.seq_ids``): it starts at position 0 and attends only to itself, so what is trained is
what is served (without it an answer would see, and could learn to copy, the unrelated answers
packed before it). An item longer than the window is cut into window-sized
pieces (counted in ``Packing.items_cut``); a piece with no target is dropped. Pure logic: no
llama.cpp here, the vocabulary is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapter_chat.chat_template import (
    ChatTemplate,
    TokenizedConversation,
    Vocab,
    tokenize_conversation,
    trained_messages,
)

IGNORE_INDEX = -1
MAX_SEQS = 64
"""Sequences per window, as ``trainer.llama_opt.MAX_PACKED_SEQS`` (the training context's n_seq_max)."""


class Example(Protocol):
    """What packing needs of a dataset item: the conversation, or a plain text."""

    text: str
    messages: Sequence[dict[str, Any]] | None


def tokenize_example(vocab: Vocab, template: ChatTemplate, example: Example | str) -> TokenizedConversation:
    """Chat and pair items: rendered with the chat template (no generation prompt), only the
    assistant turns (``weight`` other than 0) and their end-of-turn tokens are targets. A plain
    completion text (an item without messages, or a ``str``): every token is a target (special
    tokens parsed, as written)."""
    if isinstance(example, str):
        ids = vocab.tokenize(example, add_special=vocab.add_bos, parse_special=True)
        return TokenizedConversation(ids, [True] * len(ids))
    if example.messages:
        messages = [dict(m) for m in example.messages]
        segments = template.render_segments(messages, add_generation_prompt=False)
        return tokenize_conversation(vocab, segments, trained_messages(messages))
    ids = vocab.tokenize(example.text, add_special=vocab.add_bos, parse_special=True)
    return TokenizedConversation(ids, [True] * len(ids))


@dataclass(frozen=True)
class Window:
    """``n_ctx`` input ids, ``n_ctx`` labels (next token, or IGNORE_INDEX), and per position the
    sequence id of the item it belongs to (0, 1, ... in window order; the padding is one more
    sequence). Each item is trained as its own sequence: from position 0, attending only to itself,
    as it is served."""

    inputs: list[int]
    labels: list[int]
    seq_ids: list[int]
    negatives: tuple[tuple[int, int], ...] = ()
    """Unlikelihood targets: (position, token) pairs at labelled positions (``repeat_negatives``)."""
    n_tokens: int = 0
    """Positions holding items; the rest is the padding, which nothing reads (0: all of them)."""

    @property
    def n_labelled(self) -> int:
        return sum(1 for t in self.labels if t >= 0)


@dataclass
class Packing:
    """The windows and what packing did to the items."""

    windows: list[Window]
    n_ctx: int
    items: int = 0
    items_cut: int = 0
    """Items longer than a window, split across windows (their later pieces lack the start)."""
    items_without_targets: int = 0
    """Items with no training target at all (e.g. every assistant turn has weight 0): skipped."""
    labelled_tokens: int = 0
    negatives: int = 0
    """Unlikelihood targets in the windows (0 unless ``[train] unlikelihood`` is on)."""
    positions: int = 0
    per_window: list[int] = field(default_factory=list)

    @property
    def fill(self) -> float:
        """Share of window positions holding an item's token (the rest is padding)."""
        return self.positions / (len(self.windows) * self.n_ctx) if self.windows else 0.0

    def report(self) -> dict[str, Any]:
        return {
            "windows": len(self.windows),
            "n_ctx": self.n_ctx,
            "items": self.items,
            "items_cut": self.items_cut,
            "items_without_targets": self.items_without_targets,
            "labelled_tokens": self.labelled_tokens,
            "negatives": self.negatives,
            "fill": round(self.fill, 4),
        }


def item_labels(conv: TokenizedConversation) -> list[int]:
    """Per position of ``conv.ids``: the next id if it is a target, else IGNORE_INDEX (the last
    position predicts nothing: what follows it in a window is another item)."""
    ids, mask = conv.ids, conv.mask
    out = [ids[j + 1] if mask[j + 1] else IGNORE_INDEX for j in range(len(ids) - 1)]
    out.append(IGNORE_INDEX)
    return out


_MARKER = re.compile(r"[\s\d.)*#\-•]*")
"""A token made only of list numbering, bullets, bold markers or spaces opens a line's content."""


def _lines(positions: range, ids: Sequence[int], piece: Callable[[int], str]) -> list[list[int]]:
    """The positions of each line's content tokens in one assistant turn: a line ends with a
    token holding a newline; its leading marker tokens (``1.``, ``-``, ``**``) are skipped, so
    ``3. X`` and ``1. X`` have the same content."""
    lines: list[list[int]] = []
    line: list[int] = []
    for p in positions:
        text = piece(ids[p])
        if line or not _MARKER.fullmatch(text):
            line.append(p)
        if "\n" in text:
            if line:
                lines.append(line)
            line = []
    if line:
        lines.append(line)
    return lines


def repeat_negatives(conv: TokenizedConversation, piece: Callable[[int], str]) -> list[tuple[int, int]]:
    """Unlikelihood targets of one item: (position, token) pairs, where ``position``'s label is
    a line's token and ``token`` is what an earlier line of the same assistant turn had at the
    first place the two lines differ (their content before it being equal). ``piece`` gives a
    token's text. Pure logic: see the module docstring."""
    ids, mask = conv.ids, conv.mask
    out: set[tuple[int, int]] = set()
    j, n = 0, len(ids)
    while j < n:
        if not mask[j] or j == 0:
            j += 1
            continue
        k = j
        while k < n and mask[k]:
            k += 1
        lines = _lines(range(j, k), ids, piece)
        for li, line in enumerate(lines):
            for earlier in lines[:li]:
                for a, b in zip(line, earlier, strict=False):
                    if ids[a] != ids[b]:
                        out.add((a - 1, ids[b]))
                        break
        j = k
    return sorted(out)


def pack(
    convs: Sequence[TokenizedConversation],
    n_ctx: int,
    pad_id: int,
    *,
    max_seqs: int = MAX_SEQS,
    negatives: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> Packing:
    """First-fit packing of ``convs`` into windows of ``n_ctx`` positions (see module docstring),
    at most ``max_seqs`` sequences (items, and the padding) per window. ``negatives`` (one list
    per conv, item positions, e.g. from ``repeat_negatives``) move with their item into its
    window."""
    if negatives is not None and len(negatives) != len(convs):
        raise ValueError(f"negatives must hold one list per conversation ({len(convs)}), got {len(negatives)}")
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be >= 2, got {n_ctx}")
    if max_seqs < 2:
        raise ValueError(f"max_seqs must be >= 2 (an item and the padding), got {max_seqs}")
    result = Packing(windows=[], n_ctx=n_ctx)
    pieces: list[tuple[list[int], list[int], list[tuple[int, int]]]] = []
    for c, conv in enumerate(convs):
        result.items += 1
        labels = item_labels(conv)
        if not any(t >= 0 for t in labels):
            result.items_without_targets += 1
            continue
        if len(conv.ids) > n_ctx:
            result.items_cut += 1
        negs = negatives[c] if negatives is not None else ()
        for start in range(0, len(conv.ids), n_ctx):
            x, y = conv.ids[start : start + n_ctx], labels[start : start + n_ctx]
            if any(t >= 0 for t in y):
                pieces.append((x, y, [(p - start, t) for p, t in negs if start <= p < start + n_ctx and labels[p] >= 0]))
    bins: list[tuple[list[int], list[int], list[int], list[tuple[int, int]]]] = []
    for x, y, negs in pieces:
        for bx, by, bs, bn in bins:
            if len(bx) + len(x) <= n_ctx and bs[-1] + 2 < max_seqs:
                seq = bs[-1] + 1
                bn.extend((p + len(bx), t) for p, t in negs)
                bx.extend(x)
                by.extend(y)
                bs.extend([seq] * len(x))
                break
        else:
            bins.append((list(x), list(y), [0] * len(x), list(negs)))
    for bx, by, bs, bn in bins:
        result.positions += len(bx)
        pad = n_ctx - len(bx)
        window = Window(bx + [pad_id] * pad, by + [IGNORE_INDEX] * pad, bs + [bs[-1] + 1] * pad, tuple(bn), len(bx))
        result.windows.append(window)
        result.per_window.append(window.n_labelled)
        result.labelled_tokens += window.n_labelled
        result.negatives += len(window.negatives)
    return result


__all__ = [
    "IGNORE_INDEX", "Example", "Packing", "Window", "item_labels", "pack", "repeat_negatives", "tokenize_example",
]  # fmt: skip
