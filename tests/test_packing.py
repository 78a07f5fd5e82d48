"""Assistant-only loss masks and window packing: pure logic, a fake vocabulary, no model."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_chat.chat_template import ChatTemplate, tokenize_conversation, trained_messages
from trainer.packing import IGNORE_INDEX, pack, tokenize_example

EOT = 2


class CharVocab:
    """One id per character; '<|im_end|>' is one special id (2) only where special tokens parse."""

    add_bos = False

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if parse_special and text.startswith("<|im_end|>", i):
                out.append(EOT)
                i += len("<|im_end|>")
            else:
                out.append(1000 + ord(text[i]))
                i += 1
        return out

    def is_eog(self, token: int) -> bool:
        return token == EOT


@dataclass(frozen=True)
class Chat:
    text: str
    messages: tuple[dict, ...] | None


def _targets(messages: list[dict]) -> str:
    tpl = ChatTemplate(None)
    conv = tokenize_conversation(CharVocab(), tpl.render_segments(messages, add_generation_prompt=False),
                                 trained_messages(messages))  # fmt: skip
    return "".join("|" if t == EOT else chr(t - 1000) for t, m in zip(conv.ids, conv.mask) if m)


def test_only_assistant_turns_and_their_end_of_turn_are_targets() -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "A2"},
    ]
    assert _targets(msgs) == "A1|A2|"
    msgs[2]["weight"] = 0  # OpenAI's per-message weight: this turn is context, not a target
    assert _targets(msgs) == "A2|"


def test_special_looking_content_is_text_not_a_control_token() -> None:
    msgs = [{"role": "user", "content": "say <|im_end|>"}, {"role": "assistant", "content": "ok <|im_end|> done"}]
    tpl = ChatTemplate(None)
    conv = tokenize_conversation(CharVocab(), tpl.render_segments(msgs, add_generation_prompt=False),
                                 trained_messages(msgs))  # fmt: skip
    # exactly one EOT per turn (the template's), none from the content
    assert conv.ids.count(EOT) == 2
    assert _targets(msgs) == "ok <|im_end|> done|"


def test_items_are_packed_whole_and_long_ones_are_cut_and_counted() -> None:
    tpl = ChatTemplate(None)
    vocab = CharVocab()
    short = [Chat("", ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 10})) for _ in range(5)]
    long = Chat("", ({"role": "user", "content": "q"}, {"role": "assistant", "content": "b" * 150}))
    no_target = Chat("", ({"role": "user", "content": "q"}, {"role": "assistant", "content": "c", "weight": 0}))
    convs = [tokenize_example(vocab, tpl, c) for c in [*short, long, no_target]]
    n = len(convs[0].ids)
    p = pack(convs, 64, pad_id=0)
    assert p.items == 7 and p.items_cut == 1 and p.items_without_targets == 1
    assert all(len(w.inputs) == len(w.labels) == 64 for w in p.windows)
    # every short item sits whole inside one window, starting where its tokens start
    for c in convs[:5]:
        assert any(
            w.inputs[i : i + n] == c.ids for w in p.windows for i in range(0, 64 - n + 1)
        )
    # labels: the next token where it is a target, else ignored; padding is ignored
    assert sum(w.n_labelled for w in p.windows) == p.labelled_tokens
    assert p.labelled_tokens == 5 * (10 + 1) + (150 + 1) - 0  # answers + their end-of-turn
    # a label is the token that follows in the item: the next input, except where a long item
    # was cut (its piece's last position predicts the next piece's first token)
    elsewhere = sum(
        1 for w in p.windows for j, y in enumerate(w.labels) if y != IGNORE_INDEX and (j + 1 == 64 or w.inputs[j + 1] != y)
    )
    assert elsewhere <= len(convs[5].ids) // 64
    assert 0 < p.fill <= 1


def test_each_packed_item_is_its_own_sequence() -> None:
    """seq_ids: one run per item in window order, the padding one more; never more runs than
    max_seqs (a window that would hold more starts a new one)."""
    tpl = ChatTemplate(None)
    vocab = CharVocab()
    chats = [Chat("", ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * k})) for k in range(1, 9)]
    convs = [tokenize_example(vocab, tpl, c) for c in chats]
    p = pack(convs, 512, pad_id=0)
    assert len(p.windows) == 1
    w = p.windows[0]
    assert len(w.seq_ids) == 512 and w.seq_ids == sorted(w.seq_ids)
    runs = [len([s for s in w.seq_ids if s == k]) for k in range(max(w.seq_ids) + 1)]
    assert runs[:-1] == [len(c.ids) for c in convs] and runs[-1] == 512 - sum(len(c.ids) for c in convs)
    # n_tokens: where the padding starts; no label after it (a step need not compute the padding)
    assert w.n_tokens == sum(len(c.ids) for c in convs) and all(t < 0 for t in w.labels[w.n_tokens:])
    capped = pack(convs, 512, pad_id=0, max_seqs=4)  # three items and the padding per window
    assert [len(set(w.seq_ids)) for w in capped.windows] == [4, 4, 3]
    assert sum(capped.per_window) == p.labelled_tokens


def test_a_plain_text_item_trains_on_every_token() -> None:
    conv = tokenize_example(CharVocab(), ChatTemplate(None), Chat("abc<|im_end|>", None))
    assert conv.ids == [1000 + ord("a"), 1000 + ord("b"), 1000 + ord("c"), EOT] and all(conv.mask)


class WordVocab(CharVocab):
    """One id per word (and one per newline), so lines and their first words are easy to name."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        import re

        out = []
        for w in re.findall(r"<\|im_end\|>|\n|[^ \n]+ ?", text):
            if parse_special and w == "<|im_end|>":
                out.append(EOT)
            else:
                out.append(self.ids.setdefault(w, 1000 + len(self.ids)))
        return out

    def piece(self, token: int) -> str:
        return "<|im_end|>" if token == EOT else {v: k for k, v in self.ids.items()}[token]


def test_repeat_negatives_mark_the_earlier_lines_token_where_a_line_moves_on() -> None:
    """Unlikelihood targets: where a numbered line first differs from an earlier line of the same
    answer, the earlier line's token is a negative at that position; numbering does not count."""
    from trainer.packing import repeat_negatives

    vocab = WordVocab()
    answer = "Why:\n1. Boring tech wins.\n2. Boring code ships.\n3. Hire slowly.\n"
    msgs = [{"role": "user", "content": "Boring tech?"}, {"role": "assistant", "content": answer}]
    conv = tokenize_example(vocab, ChatTemplate(None), Chat("", tuple(msgs)))
    negs = repeat_negatives(conv, vocab.piece)
    named = {(vocab.piece(conv.ids[p + 1]), vocab.piece(t)) for p, t in negs}  # (true next token, negative)
    # line 2 shares "Boring " with line 1 and moves on at "code ": "tech " is the negative there
    assert ("code ", "tech ") in named
    # line 3 differs from lines 1 and 2 at its first content word, and from "Why:" too
    assert {("Hire ", "Boring "), ("Hire ", "Why:")} <= named
    # every negative sits at a trained position, and is never the true next token
    for p, t in negs:
        assert conv.mask[p + 1] and conv.ids[p + 1] != t
    # nothing is taken from the user's question, and the numbers "2. "/"3. " are not compared
    assert not any(neg in ("1. ", "2. ") for _, neg in named)
    # packing carries them into the window at the item's offset there
    first = tokenize_example(vocab, ChatTemplate(None), Chat("", ({"role": "user", "content": "x"},
                                                                   {"role": "assistant", "content": "y"})))
    packing = pack([first, conv], 256, pad_id=0, negatives=[[], negs])
    (window,) = packing.windows
    offset = len(first.ids)
    assert window.negatives == tuple((p + offset, t) for p, t in negs)
    assert packing.negatives == len(negs) > 0
    assert all(window.labels[p] >= 0 for p, _ in window.negatives)
