"""OpenAI wire models: every request and response shape the HTTP API speaks, in one place.

Requests are pydantic models that accept unknown fields (real clients send them; they are ignored).
Responses are built by small functions returning plain dicts, which is what goes on the wire.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.errors import InvalidRequest, Unsupported

MAX_STOP = 16
MAX_STOP_LEN = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """Content flattened to a string; images and other parts are refused."""
        if self.role in ("tool", "function"):
            raise Unsupported("tool messages are not supported by this server", param=f"messages[{index}].role")
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise InvalidRequest(f"messages[{index}].content is required", param=f"messages[{index}].content")
        if isinstance(self.content, str):
            return self.content
        out = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise Unsupported(
                    f"content part type {part.type!r} is not supported; only text parts are",
                    param=f"messages[{index}].content[{j}].type",
                )
            out.append(part.text)
        return "".join(out)


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    scale: float = Field(1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=512)
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    adapters: list[AdapterSpec] | None = Field(None, max_length=8)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s or len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_LEN} characters")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.n not in (None, 1):
            raise Unsupported("n other than 1 is not supported: send one request per completion", param="n")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise Unsupported(f"{name} (function calling) is not supported by this server", param=name)
        if self.tool_choice not in (None, "none"):
            raise Unsupported("tool_choice is not supported by this server", param="tool_choice")
        if self.logprobs:
            raise Unsupported("logprobs are not supported by this server", param="logprobs")
        rf = self.response_format
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise Unsupported("only response_format {'type': 'text'} is supported", param="response_format")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a rating (-1, 0, 1) and an optional corrected answer for a response id."""

    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=128)
    rating: Literal[-1, 0, 1]
    corrected: str | None = Field(None, max_length=100_000)
    comment: str | None = Field(None, max_length=10_000)


class RunsQuery(BaseModel):
    """GET /v1/runs query string: the newest `limit` trainer runs, optionally of one adapter."""

    model_config = ConfigDict(extra="ignore")
    limit: int = Field(20, ge=1, le=200)
    adapter: str | None = Field(None, min_length=1, max_length=64)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "tagged-union"}


def _field_path(loc: tuple) -> str:
    """pydantic's error location without the union-branch tags it inserts ('str', 'list[TextPart]')."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in _TYPE_TAGS or "[" in p or "(" in p or p.startswith(("function-", "literal")) or p[:1].isupper():
            continue
        else:
            parts.append(("." if parts else "") + p)
    return "".join(parts)


def describe_validation_error(err: Any) -> tuple[str, str | None]:
    """pydantic ValidationError -> (message naming the field, param)."""
    errors = err.errors(include_url=False, include_context=False)
    first = errors[0]
    loc = _field_path(first["loc"])
    same_field = [e for e in errors if _field_path(e["loc"]) == loc]
    if first.get("type") == "missing":
        msg = "field required"
    elif len(same_field) > 1:
        msg = "invalid value: " + "; or ".join(e["msg"] for e in same_field)
    else:
        msg = first["msg"]
    text = f"{loc}: {msg}" if loc else msg
    others = len(errors) - len(same_field)
    if others > 0:
        text += f" (and {others} more problem{'s' if others > 1 else ''})"
    return text, loc or None


# ---------------------------------------------------------------------------------------------
# responses


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion(
    id_: str, model: str, created: int, text: str, finish_reason: str, use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": use,
    }


def chunk(
    id_: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    use: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None}],
    }
    if include_usage:
        out["usage"] = use
    return out


def model_card(id_: str, owned_by: str, parent: str | None = None, **extra: Any) -> dict[str, Any]:
    card = {"id": id_, "object": "model", "created": int(time.time()), "owned_by": owned_by}
    if parent is not None:
        card["parent"] = parent
    card.update(extra)
    return card


def trainer_run(row: dict[str, Any]) -> dict[str, Any]:
    """One `trainer_runs` row on the wire (GET /v1/runs).

    The evaluation's greedy samples are left out: they are held-out prompts from users'
    conversations, which an API key does not otherwise give access to. Their count stays.
    """
    metrics = dict(row.get("metrics") or {})
    ev = metrics.get("eval")
    if isinstance(ev, dict) and "samples" in ev:
        samples = ev["samples"]
        metrics["eval"] = {k: v for k, v in ev.items() if k != "samples"}
        metrics["eval"]["n_samples"] = len(samples) if isinstance(samples, list) else 0
    return {
        "object": "trainer.run",
        "id": row["id"],
        "adapter": row["adapter"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "status": row["status"],
        "version": row["version"],
        "reason": row["reason"],
        "metrics": metrics,
    }
