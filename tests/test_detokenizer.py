"""The per-request detokenizer without a model: UTF-8 across tokens, stop strings, holdback."""

from __future__ import annotations

import pytest

from adapter_chat.detokenizer import IncrementalDetokenizer, holdback


def run(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """Feed `pieces` as the engine does; the deltas handed out, and whether a stop string hit."""
    d = IncrementalDetokenizer(stop)
    deltas = []
    for piece in pieces:
        if d.update(piece):
            deltas.append(d.next_delta(final=True))
            return [x for x in deltas if x], True
        deltas.append(d.next_delta())
    d.flush()
    deltas.append(d.next_delta(final=True))
    return [x for x in deltas if x], False


@pytest.mark.parametrize(
    "text, stops, hold",
    [("Hello wor", ("world",), 3), ("Hello", ("lo!",), 2), ("abc", ("x",), 0), ("a##", ("###",), 2),
     ("", ("x",), 0)],
)
def test_stop_string_holdback(text: str, stops: tuple, hold: int) -> None:
    assert holdback(text, stops) == hold


def test_a_stop_string_split_across_tokens_is_never_sent() -> None:
    deltas, stopped = run([b"Hel", b"lo wo", b"rld!"], ("world",))
    assert stopped
    assert deltas == ["Hel", "lo "]  # "wo" was held back, then cut with the stop string


def test_held_back_text_is_sent_once_it_cannot_become_a_stop() -> None:
    deltas, stopped = run([b"a#", b"#b", b"c"], ("###",))
    assert not stopped
    assert "".join(deltas) == "a##bc"
    assert deltas[0] == "a"


def test_the_earliest_stop_string_wins_and_the_text_after_it_is_dropped() -> None:
    deltas, stopped = run([b"foo END bar STOP baz"], ("STOP", "END"))
    assert stopped and "".join(deltas) == "foo "


def test_a_character_split_across_tokens_comes_out_whole() -> None:
    deltas, _ = run([b"caf\xc3", b"\xa9 ok"])
    assert deltas == ["caf", "é ok"]


def test_a_dangling_partial_character_becomes_a_replacement_at_the_length_limit() -> None:
    deltas, _ = run([b"ab\xe2\x82"])
    assert "".join(deltas) == "ab\ufffd"


def test_without_stops_every_token_is_sent_at_once() -> None:
    deltas, _ = run([b"one ", b"two ", b"three"])
    assert deltas == ["one ", "two ", "three"]
