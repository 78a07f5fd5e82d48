"""Tool calling (OpenAI's ``tools`` / ``tool_choice``): prompts, constraints and parsing. Pure logic.

Owns:

- the request's tools as :class:`Tool` (name, description, JSON-schema parameters) and its
  ``tool_choice`` as :class:`ToolChoice` (``none``, ``auto``, ``required`` or one function);
- the conversation as the chat template sees it: assistant ``tool_calls`` and ``tool`` results
  become text in the default tool format, and the tools are described in a system message
  (:data:`DEFAULT_TOOL_PROMPT`) when the model's chat template has no tool support of its own;
- the JSON schema a forced call must follow (``required``: one of the tools; a named function:
  that one), which the chat service compiles to a grammar;
- parsing calls out of the generated text (:func:`parse_calls`), and, while streaming with
  ``auto``, holding back text that may still turn out to be a call (:class:`CallDetector`).

The default format is the one Hermes- and Qwen-style templates use::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

DEFAULT_TOOL_PROMPT = """You can call functions to help answer the user. The functions are:

{tools}

To call a function, reply with only this, and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": {{<the arguments as a JSON object>}}}}
</tool_call>
When a function's result is given to you, use it to answer the user."""


class ToolError(ValueError):
    """A malformed ``tools``, ``tool_choice`` or tool message: the message names what to fix."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}  # fmt: skip


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(raw: Any) -> list[Tool]:
    if not isinstance(raw, list) or not raw:
        raise ToolError("tools must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    out: list[Tool] = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError(f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}", where)
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", f"{where}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        if any(o.name == name for o in out):
            raise ToolError(f"{where}: two tools are named {name!r}", f"{where}.function.name")
        out.append(Tool(name, desc, params))
    return out


def parse_tool_choice(raw: Any, tools: list[Tool]) -> ToolChoice:
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if raw in ("none", "auto", "required"):
        if raw != "none" and not tools:
            raise ToolError(f"tool_choice {raw!r} needs tools", "tool_choice")
        return ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if not any(t.name == name for t in tools):
            raise ToolError(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        return ToolChoice("function", name)
    raise ToolError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                    "{'name': ...}}", "tool_choice")  # fmt: skip


def call_text(name: str, arguments: str) -> str:
    """A call in the default format (how an assistant's earlier ``tool_calls`` are rendered)."""
    try:
        args: Any = json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        args = arguments
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def tool_system_prompt(tools: list[Tool]) -> str:
    listed = "\n".join(json.dumps(t.to_openai()["function"], ensure_ascii=False) for t in tools)
    return DEFAULT_TOOL_PROMPT.format(tools=listed)


def call_schema(tools: list[Tool], choice: ToolChoice) -> dict[str, Any]:
    """The JSON schema of one forced call: ``{"name": <a tool>, "arguments": <its parameters>}``."""
    chosen = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    variants = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                 "required": ["name", "arguments"]} for t in chosen]  # fmt: skip
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def parse_calls(text: str, tools: list[Tool]) -> list[ToolCall] | None:
    """The calls in a generated answer: ``<tool_call>`` blocks, or the whole answer as one bare
    call object. None when the answer is not (only) calls: it is then an ordinary message."""
    names = {t.name for t in tools}
    stripped = text.strip()
    if not stripped:
        return None
    if stripped.startswith(OPEN):
        calls = []
        for block in re.findall(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", stripped, flags=re.S):
            try:
                call = _as_call(json.loads(block.strip()), names)
            except json.JSONDecodeError:
                return None
            if call is None:
                return None
            calls.append(call)
        return calls or None
    try:
        call = _as_call(json.loads(stripped), names)
    except json.JSONDecodeError:
        return None
    return [call] if call is not None else None


class CallDetector:
    """Streaming with ``tool_choice: auto``: text is held back while it could still be the start of
    a call; once it cannot, it flows as content. :meth:`feed` returns the text to send now."""

    def __init__(self) -> None:
        self.buffer = ""
        self.state: Literal["undecided", "content", "call"] = "undecided"

    def feed(self, text: str) -> str:
        if self.state == "content":
            return text
        self.buffer += text
        if self.state == "call":
            return ""
        head = self.buffer.lstrip()
        if not head:
            return ""
        if head.startswith(OPEN) or head.startswith("{"):
            self.state = "call"
            return ""
        if OPEN.startswith(head):
            return ""
        self.state = "content"
        out, self.buffer = self.buffer, ""
        return out


def render_messages(messages: list[dict[str, Any]], tools: list[Tool], *, native: bool) -> list[dict[str, Any]]:
    """The conversation as the chat template renders it. ``native``: the template knows tools
    (messages keep ``tool_calls``; tool results stay role ``tool``). Otherwise calls become
    assistant text in the default format, results become ``tool`` turns of text, and the tool
    list is described in a system message (merged into the first one if there is one)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if native:
            out.append(m)
            continue
        if m["role"] == "assistant" and calls:
            text = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls)
            content = (m.get("content") or "").strip()
            out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools and not native:
        prompt = tool_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


__all__ = [
    "CLOSE",
    "DEFAULT_TOOL_PROMPT",
    "OPEN",
    "CallDetector",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolError",
    "call_schema",
    "call_text",
    "new_call_id",
    "parse_calls",
    "parse_tool_choice",
    "parse_tools",
    "render_messages",
    "tool_system_prompt",
]
