"""Rendering chat messages with the base model's own chat template, in Jinja's immutable sandbox.

Owns the one way text is laid out for the model, shared by the server (prompts) and the trainer
(training text), so what is trained is what is served.

`render_segments` keeps user-supplied content apart from template text, and
`tokenize_segments` / `tokenize_conversation` are the one way a conversation becomes token ids,
for the server's prompts and the trainer's windows alike: template text is tokenized with
special-token parsing and message content without it (a user who types `<|im_start|>` gets those
characters, never a control token), and BOS is added when the vocabulary asks for it. For
training, the same ids come with a loss mask: only assistant messages (with `weight` other than
0) and the end-of-turn token that closes each of them count.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a GGUF carries no template (ChatML, as SmolLM2 and many small models use).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template failed to render these messages (the message says why)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now(timezone.utc).strftime(fmt)


def sandbox() -> ImmutableSandboxedEnvironment:
    """The Jinja environment every template in this project renders in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"], autoescape=False
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered prompt; `content` is True for text that came from a message,
    and `message` is that message's index (None for template text)."""

    text: str
    content: bool
    message: int | None = None


class Vocab(Protocol):
    """What tokenizing needs from a model's vocabulary (the llama.cpp bindings implement it)."""

    add_bos: bool

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def is_eog(self, token: int) -> bool: ...


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids of a rendered conversation and, per id, whether it is a training target."""

    ids: list[int]
    mask: list[bool]

    @property
    def n_targets(self) -> int:
        return sum(self.mask)


def tokenize_segments(vocab: Vocab, segments: list[Segment]) -> list[int]:
    """The served prompt's token ids (see the module docstring)."""
    return tokenize_conversation(vocab, segments).ids


def tokenize_conversation(
    vocab: Vocab, segments: list[Segment], trained: set[int] | frozenset[int] = frozenset()
) -> TokenizedConversation:
    """Token ids of `segments`, and the loss mask: the ids of the messages whose index is in
    `trained`, and after each of them the template's tokens up to and including the first
    end-of-generation token (ChatML's `<|im_end|>`), which teaches the model to stop."""
    ids: list[int] = []
    mask: list[bool] = []
    closing = False  # inside the template text right after a trained message
    for i, seg in enumerate(segments):
        toks = vocab.tokenize(seg.text, add_special=(i == 0 and vocab.add_bos), parse_special=not seg.content)
        if seg.content:
            target = seg.message is not None and seg.message in trained
            ids.extend(toks)
            mask.extend([target] * len(toks))
            closing = target
            continue
        for t in toks:
            ids.append(t)
            mask.append(closing)
            if closing and vocab.is_eog(t):
                closing = False
        closing = False
    return TokenizedConversation(ids, mask)


def trained_messages(messages: list[dict[str, Any]]) -> set[int]:
    """Indexes of the assistant messages a training run learns: all of them, except those with
    `weight: 0` (OpenAI's fine-tuning chat format)."""
    return {i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("weight", 1) != 0}


class ChatTemplate:
    """A compiled chat template plus the special tokens it refers to."""

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = template or CHATML_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = sandbox().from_string(self.source)

    @classmethod
    def from_model(cls, info: Any) -> ChatTemplate:
        """From a `BaseModelInfo` (anything with chat_template, bos_token, eos_token)."""
        return cls(info.chat_template, info.bos_token, info.eos_token)

    @property
    def supports_tools(self) -> bool:
        """The template renders OpenAI ``tools`` itself (it refers to a ``tools`` variable)."""
        return re.search(r"\btools\b", self.source) is not None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt as one string (what the trainer learns from)."""
        return "".join(s.text for s in self.render_segments(messages, add_generation_prompt))

    def render_segments(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> list[Segment]:
        """The prompt split into template text and message content (``tools``: OpenAI tool
        definitions, for a template that :attr:`supports_tools`)."""
        # Markers of private-use characters: not whitespace, so a template's `| trim` keeps them.
        tag = secrets.token_hex(8)
        markers = {f"\ue000{tag}:{i}\ue001": (i, m["content"]) for i, m in enumerate(messages)}
        marked = [{**m, "content": key} for key, m in zip(markers, messages)]
        text = self._render_raw(marked, add_generation_prompt, tools)
        pieces = re.split(f"(\ue000{tag}:[0-9]+\ue001)", text)
        if any(m not in pieces for m in markers):
            # The template transformed the content (e.g. stripped it), so markers did not survive
            # intact: render the real content and treat the whole prompt as content (no special
            # token parsing at all), which is always safe, if less faithful.
            return [Segment(self._render_raw(messages, add_generation_prompt, tools), content=True)]
        segments = []
        for piece in pieces:
            if not piece:
                continue
            if piece in markers:
                index, content = markers[piece]
                segments.append(Segment(content, content=True, message=index))
            else:
                segments.append(Segment(piece, content=False))
        return segments

    def _render_raw(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    tools: list[dict] | None = None) -> str:  # fmt: skip
        # `weight` is the trainer's (see trained_messages), never the template's business
        messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        extra = {"tools": tools} if tools else {}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None


def render_system_prompt(source: str, variables: dict[str, Any]) -> str:
    """Render a route's system prompt template (from prompts/) in the sandbox."""
    env = sandbox()
    env.undefined = StrictUndefined
    try:
        return env.from_string(source).render(**variables).strip()
    except TemplateError as e:
        raise ChatTemplateError(f"system prompt template failed: {e}") from None
