"""A training item, the dataset's error, and rendering a conversation as the server does.

Owns `Item` (one training example, wherever it came from), `DatasetError` (every problem with
the input at once, each naming its file and line) and the helpers both readers use: flattening
OpenAI content parts and rendering a chat with the base's template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapter_chat.chat_template import ChatTemplate

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


def check_messages(raw: Any, where: str, problems: list[str]) -> list[dict[str, str]] | None:
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
