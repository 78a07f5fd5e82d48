"""OpenAI wire models: every request and response shape the HTTP API speaks, in one place.

Requests are pydantic models that accept unknown fields (real clients send them; they are ignored).
Responses are built by small functions returning plain dicts, which is what goes on the wire.

Over the ~400-line guide on purpose: a flat reference of OpenAI's wire shapes, one model or
builder per shape, read by looking a shape up rather than top to bottom.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapter_chat.identity import AdapterRef
from adapter_chat.records import TrainerRun
from server.errors import InvalidRequest, Unsupported

MAX_STOP = 16
MAX_STOP_LEN = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=100_000)


class ToolCallIn(BaseModel):
    """An assistant message's earlier ``tool_calls[]`` entry, sent back in the history."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=128)

    def text(self, index: int) -> str:
        """Content flattened to a string; images and other parts are refused."""
        if self.role == "function":
            raise Unsupported("role 'function' (deprecated) is not supported: send the result as a 'tool' message",
                              param=f"messages[{index}].role")  # fmt: skip
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidRequest(f"messages[{index}].tool_call_id is required for a tool message",
                                 param=f"messages[{index}].tool_call_id")  # fmt: skip
        if self.tool_calls and self.role != "assistant":
            raise InvalidRequest(f"messages[{index}].tool_calls is only for assistant messages",
                                 param=f"messages[{index}].tool_calls")  # fmt: skip
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's structured-outputs shape."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with a name and a schema")
        return self


MAX_GRAMMAR_CHARS = 100_000
MAX_CHOICES = 16
MAX_LOGIT_BIAS = 1024


class GenerationRequest(BaseModel):
    """The fields chat and text completions share: model, sampling, stops, choices, adapters."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    adapters: list[AdapterRef] | None = Field(None, max_length=8)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    response_format: ResponseFormat | None = None

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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        for key, bias in v.items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"keys are token ids, got {key[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} is {bias}: it must be between -100 and 100")
        return v

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerationRequest:
        if self.grammar is not None and self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest("send either grammar or a JSON response_format, not both", param="grammar")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    def logprobs_count(self) -> int | None:
        """None: no logprobs; else how many top alternatives per token."""
        return None


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise Unsupported(f"{name} (deprecated) is not supported: use tools and tool_choice", param=name)
        extra = self.model_extra or {}
        if extra.get("audio") is not None:
            raise Unsupported("audio output is not supported by this server (text only)", param="audio")
        modalities = extra.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise Unsupported("modalities other than ['text'] are not supported by this server", param="modalities")
        if extra.get("web_search_options") is not None:
            raise Unsupported("web search is not supported by this server", param="web_search_options")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        called: set[str] = set()
        for i, m in enumerate(self.messages):
            if m.role == "assistant" and m.tool_calls:
                called.update(c.id for c in m.tool_calls)
            elif m.role == "tool" and m.tool_call_id is not None and m.tool_call_id not in called:
                raise InvalidRequest(
                    f"messages[{i}] answers tool call {m.tool_call_id[:64]!r}, which no earlier assistant message made",
                    param=f"messages[{i}].tool_call_id",
                )
        return self

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


MAX_PROMPTS = 16


class CompletionRequest(GenerationRequest):
    """POST /v1/completions (OpenAI's legacy text completions): raw text in, text out."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for text completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise Unsupported("suffix (fill in the middle) is not supported by this server", param="suffix")
        if self.best_of not in (None, 1) and self.best_of != (self.n or 1):
            raise Unsupported("best_of other than n is not supported: ask for n choices and pick", param="best_of")
        prompts = self.prompt if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int) \
            else [self.prompt]  # fmt: skip
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        if any(len(p) == 0 for p in prompts):
            raise InvalidRequest("a prompt is empty", param="prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a text, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("send exactly one of prompt or messages", param="prompt")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


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


def _envelope(id_: str, obj: str, created: int, model: str) -> dict[str, Any]:
    """The fields every completion body and chunk starts with."""
    return {"id": id_, "object": obj, "created": created, "model": model}


def logprobs_block(entries: list[Any] | None) -> dict[str, Any] | None:
    """``choices[].logprobs``: ``{"content": [...], "refusal": None}`` from TokenLogprob entries."""
    if entries is None:
        return None
    return {"content": [e.to_openai() for e in entries], "refusal": None}


def message(text: str, tool_calls: list[Any] | None = None) -> dict[str, Any]:
    """An assistant message: its text, or (``tool_calls``) the calls it made and no content."""
    if tool_calls:
        return {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in tool_calls]}
    return {"role": "assistant", "content": text}


def completion(
    id_: str, model: str, created: int, choices: list[tuple[dict[str, Any], str, list[Any] | None]],
    use: dict[str, Any],
) -> dict[str, Any]:
    """A chat.completion; ``choices``: (message, finish_reason, logprobs entries or None) each."""
    return {
        **_envelope(id_, "chat.completion", created, model),
        "choices": [
            {
                "index": i,
                "message": msg,
                "finish_reason": finish_reason,
                "logprobs": logprobs_block(logprobs),
            }
            for i, (msg, finish_reason, logprobs) in enumerate(choices)
        ],
        "usage": use,
    }


def tool_call_deltas(calls: list[Any]) -> dict[str, Any]:
    """A streamed delta carrying whole calls (OpenAI's ``delta.tool_calls[]``, each with its index)."""
    return {"tool_calls": [{"index": i, **c.to_openai()} for i, c in enumerate(calls)]}


def chunk(
    id_: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    use: dict[str, Any] | None = None,
    include_usage: bool = False,
    logprobs: list[Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        **_envelope(id_, "chat.completion.chunk", created, model),
        "choices": [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": logprobs_block(logprobs)}],
    }
    if include_usage:
        out["usage"] = use
    return out


def text_logprobs(entries: list[tuple[str, float | None, dict[str, float] | None]], offset: int = 0) -> dict[str, Any]:
    """Legacy ``choices[].logprobs`` of a text completion from (token, logprob, top) entries; the
    first token of an echoed prompt has no logprob (None), as in OpenAI's API."""
    offsets, pos = [], offset
    for tok, _, _ in entries:
        offsets.append(pos)
        pos += len(tok)
    return {
        "tokens": [t for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [top for _, _, top in entries],
        "text_offset": offsets,
    }


def legacy_entry(e: Any) -> tuple[str, float | None, dict[str, float] | None]:
    """A TokenLogprob as a (token, logprob, top) entry of :func:`text_logprobs`."""
    top: dict[str, float] = {}
    for piece, lp in e.top:
        top.setdefault(piece.decode("utf-8", "replace"), lp)
    return e.token.decode("utf-8", "replace"), e.logprob, top


def text_completion(
    id_: str, model: str, created: int, choices: list[tuple[str, str, dict[str, Any] | None]], use: dict[str, Any]
) -> dict[str, Any]:
    """A text_completion; ``choices``: (text, finish_reason, legacy logprobs or None) per choice."""
    return {
        **_envelope(id_, "text_completion", created, model),
        "choices": [
            {"index": i, "text": text, "finish_reason": finish, "logprobs": lp}
            for i, (text, finish, lp) in enumerate(choices)
        ],
        "usage": use,
    }


def text_chunk(
    id_: str, model: str, created: int, index: int | None, text: str = "", finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None, use: dict[str, Any] | None = None, include_usage: bool = False,
) -> dict[str, Any]:
    """One SSE chunk of a streamed text completion (``index`` None: the usage-only chunk)."""
    out: dict[str, Any] = {
        **_envelope(id_, "text_completion", created, model),
        "choices": [] if index is None else [
            {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
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


def trainer_run(run: TrainerRun) -> dict[str, Any]:
    """One `trainer_runs` row on the wire (GET /v1/runs).

    The evaluation's greedy samples are left out: they are held-out prompts from users'
    conversations, which an API key does not otherwise give access to. Their count stays.
    """
    metrics = dict(run.metrics)
    ev = metrics.get("eval")
    if isinstance(ev, dict) and "samples" in ev:
        samples = ev["samples"]
        metrics["eval"] = {k: v for k, v in ev.items() if k != "samples"}
        metrics["eval"]["n_samples"] = len(samples) if isinstance(samples, list) else 0
    return {"object": "trainer.run", **run.to_json(), "metrics": metrics}
