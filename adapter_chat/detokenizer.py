"""Per-request detokenization: token bytes in, text deltas out, stop strings cut.

Owns one request's text: the incremental UTF-8 decoding of the pieces llama.cpp returns per
token (a multi-byte character can span tokens), the search for the request's stop strings, and
the holdback: text that could still turn into a stop string is not handed out until the next
token says whether it does. The engine keeps one ``IncrementalDetokenizer`` per running sequence
and asks it for the delta to send after each token. vLLM's ``v1/engine/detokenizer.py`` is the
model (an ``update`` that reports a stop, then ``get_next_output_text``).

Pure logic: bytes in, ``str`` out; no llama.cpp here, so it is tested without a model
(``tests/test_units.py``).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still become a stop string (held back from
    the client until the next token says whether it does)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class IncrementalDetokenizer:
    """One request's generated text, decoded incrementally, with its stop strings.

    ``update(piece)`` adds one token's bytes and says whether a stop string now appears (the text
    is then cut right before it, the stop string itself never part of the output).
    ``next_delta()`` is the text not handed out yet, less the holdback; ``next_delta(final=True)``
    is all of it. ``flush()`` ends the UTF-8 decoding (an incomplete character at the end becomes
    U+FFFD) when the sequence ends on its length limit.
    """

    __slots__ = ("_decoder", "_emitted", "_max_stop", "_stops", "text")

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._emitted = 0
        self.text = ""

    def update(self, piece: bytes) -> bool:
        """Add one token's bytes; True when a stop string has appeared (the text is cut before it)."""
        self.text += self._decoder.decode(piece)
        if not self._stops:
            return False
        # A stop string can only start in text not yet handed out, or in the last max-1 characters
        # of what was (held back text is never handed out, so a match ends after _emitted).
        start = max(0, self._emitted - self._max_stop)
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def flush(self) -> None:
        """End the decoding: bytes of an incomplete character become U+FFFD."""
        self.text += self._decoder.decode(b"", final=True)

    def next_delta(self, *, final: bool = False) -> str:
        """The text not handed out yet (less what could still become a stop string, unless
        `final`); advances what has been handed out."""
        upto = len(self.text) if final else len(self.text) - holdback(self.text, self._stops)
        if upto <= self._emitted:
            return ""
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta


__all__ = ["IncrementalDetokenizer", "holdback"]
