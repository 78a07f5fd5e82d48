"""The consultancy's house style, as a check the bench and the tests can run on any answer.

An answer is in house style when it has, in this order and nothing else around them:

    **Bottom line:** <one or two sentences>

    **Why:**
    1. <reason>
    2. <reason>
    3. <reason>

    **Next step:** <one action>

    — Your fractional CTO

`style_problems` says what is missing; `is_house_style` is the structural yes/no;
`is_house_style_distinct` also wants three *different* reasons (what the trainer's gate and
`compare.py` score: a model that repeats one reason three times has learnt the scaffolding, not
the skill); `repeats_a_line` and `on_topic` measure degenerate answers; `style_share` is the
share of answers in house style.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SIGN_OFF = "— Your fractional CTO"
HOUSE_TERMS = (
    "two-way door",
    "one-way door",
    "boring tech",
    "blast radius",
    "paved road",
    "runway",
    "bus factor",
    "timebox",
)

_PATTERN = re.compile(
    r"""\A\*\*Bottom\ line:\*\*\ (?P<bottom>[^\n]+)\n
        \n
        \*\*Why:\*\*\n
        1\.\ (?P<r1>[^\n]+)\n
        2\.\ (?P<r2>[^\n]+)\n
        3\.\ (?P<r3>[^\n]+)\n
        \n
        \*\*Next\ step:\*\*\ (?P<next>[^\n]+)\n
        \n
        —\ Your\ fractional\ CTO\Z""",
    re.VERBOSE,
)


def style_problems(text: str) -> list[str]:
    """Everything that keeps `text` from being in house style (empty list: it is)."""
    t = text.strip().replace("\r\n", "\n")
    if _PATTERN.match(t):
        return []
    problems = []
    if not t.startswith("**Bottom line:** "):
        problems.append("does not open with '**Bottom line:** '")
    if "\n**Why:**\n" not in t:
        problems.append("no '**Why:**' section on its own line")
    for n in (1, 2, 3):
        if not re.search(rf"^{n}\. \S", t, re.MULTILINE):
            problems.append(f"no reason numbered '{n}. '")
    if re.search(r"^4\. ", t, re.MULTILINE):
        problems.append("more than three reasons")
    if "\n**Next step:** " not in t:
        problems.append("no '**Next step:** ' line")
    if not t.endswith(SIGN_OFF):
        problems.append(f"does not end with the sign-off '{SIGN_OFF}'")
    return problems or ["sections are out of order or separated wrongly"]


def is_house_style(text: str) -> bool:
    """True when `text` follows the house structure exactly (see the module docstring)."""
    return _PATTERN.match(text.strip().replace("\r\n", "\n")) is not None


def _norm(line: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", line.lower()).strip()


def is_house_style_distinct(text: str) -> bool:
    """`is_house_style`, and the three reasons differ from each other."""
    m = _PATTERN.match(text.strip().replace("\r\n", "\n"))
    if m is None:
        return False
    reasons = {_norm(m.group(k)) for k in ("r1", "r2", "r3")}
    return len(reasons) == 3


def repeats_a_line(text: str) -> bool:
    """True when a non-empty line (ignoring its number) occurs twice."""
    lines = [_norm(re.sub(r"^\d+\.\s*", "", ln)) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    return len(lines) != len(set(lines))


STOP_WORDS = frozenset(
    "a an and are as at be but by can do does for from had has have how i if in is it its just me my no "
    "not of on or our should so than that the their them then there these they this to too us was we "
    "were what when where which who why will with would you your yet about into over than now one two "
    "three next step bottom line".split()
)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z][a-z0-9-]{2,}", text.lower()) if w not in STOP_WORDS}


def on_topic(question: str, answer: str) -> bool:
    """True when the answer shares at least one content word with the question."""
    return bool(content_words(question) & content_words(answer))


def uses_house_vocabulary(text: str) -> bool:
    """True when `text` uses at least one of the consultancy's terms."""
    lowered = text.lower()
    return any(term in lowered for term in HOUSE_TERMS)


def style_share(texts: Iterable[str]) -> float:
    """Share of `texts` in house style (0.0 for no texts)."""
    texts = list(texts)
    return sum(is_house_style(t) for t in texts) / len(texts) if texts else 0.0
