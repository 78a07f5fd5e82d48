"""The generation endpoints: chat and text completions (JSON or SSE), tokenize, detokenize.

Thin glue over `server.chat.ChatService`: parse the request, start the exchange, then either
collect the answer (a client that disconnects cancels it) or stream it as OpenAI's SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from typing import Any

from litestar import Request, get, post
from litestar.response.base import ASGIResponse
from litestar.status_codes import HTTP_200_OK
from litestar.types import ASGIApp
from sse_starlette import EventSourceResponse

from server import protocol, tools
from server.chat import ChatService
from server.errors import APIError, InvalidRequest, body_for
from server.http_common import AUTH_API, app_state, parse_body, require_ready

log = logging.getLogger(__name__)

SSE_SHUTDOWN_GRACE_S = 25.0  # below uvicorn's timeout_graceful_shutdown (30 s, server/__main__.py)


@post("/v1/chat/completions", opt={"auth": AUTH_API}, status_code=HTTP_200_OK)
async def chat_completions(request: Request) -> ASGIApp:
    state = app_state(request)
    chat = require_ready(state)
    req = await parse_body(request, protocol.ChatCompletionRequest)
    ex = await chat.start(req, conversation_id=request.headers.get("x-conversation-id"))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(
            _sse(chat, ex, include_usage), headers=ex.headers, ping=state.settings.sse_ping_s, sep="\n",
            send_timeout=30,
            # on SIGTERM sse-starlette cuts streams at once; let them finish inside uvicorn's 30 s drain
            shutdown_grace_period=SSE_SHUTDOWN_GRACE_S,
        )
    return await _collect(request, chat, ex)


async def _collect(request: Request, chat: ChatService, ex: Any) -> ASGIResponse:
    """Non-streaming: gather the answer; a client that disconnects cancels the generation."""
    await _drain(request, chat, ex)
    usage = protocol.usage(ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens)
    choices = [(protocol.message(c.text, c.tool_calls), c.finish_reason or "stop", c.logprobs) for c in ex.choices]
    body = protocol.completion(ex.id, ex.model, ex.created, choices, usage)
    return ASGIResponse(body=json.dumps(body, ensure_ascii=False).encode(), headers=ex.headers,
                        media_type="application/json")


async def _drain(request: Request, chat: ChatService, ex: Any) -> None:
    """Run the exchange to its end (it accumulates text and logprobs); a client that disconnects
    cancels the generation."""

    async def watch_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                ex.cancel()
                return

    watcher = asyncio.create_task(watch_disconnect())
    try:
        async for _ in chat.run(ex):
            pass  # the exchange accumulates the text and the logprobs
    finally:
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher


async def _sse(chat: ChatService, ex: Any, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    def data(obj: dict[str, Any]) -> dict[str, str]:
        return {"data": json.dumps(obj, ensure_ascii=False)}

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, use: dict | None = None,
              logprobs: list | None = None, index: int = 0) -> dict[str, str]:
        return data(protocol.chunk(ex.id, ex.model, ex.created, delta, finish, use, include_usage, logprobs, index))

    # with tools offered, text that may be a call is held back (all of it when a call is forced)
    detectors = {c.index: tools.CallDetector() for c in ex.choices} if ex.tools else {}
    if ex.tool_mode in ("required", "function"):
        for d in detectors.values():
            d.state = "call"

    def close(c: Any) -> Iterator[dict[str, str]]:
        det = detectors.get(c.index)
        if c.tool_calls:
            yield chunk(protocol.tool_call_deltas(c.tool_calls), index=c.index)
        elif det is not None and det.buffer:
            yield chunk({"content": det.buffer}, index=c.index)
        yield chunk({}, c.finish_reason or "stop", index=c.index)

    for c in ex.choices:
        yield chunk({"role": "assistant", "content": ""}, index=c.index)
    finished: set[int] = set()
    try:
        async for d in chat.run(ex):
            det = detectors.get(d.index)
            text = det.feed(d.text) if det is not None else d.text
            if text or (d.logprobs and (det is None or det.state == "content")):
                yield chunk({"content": text}, logprobs=d.logprobs, index=d.index)
            for c in ex.choices:  # a choice whose final event came with this delta
                if c.done and c.index not in finished and len(ex.choices) > 1:
                    finished.add(c.index)
                    for out in close(c):
                        yield out
    except APIError as e:
        yield data(body_for(e))
        yield {"data": "[DONE]"}
        return
    for c in ex.choices:
        if c.index not in finished:
            for out in close(c):
                yield out
    if include_usage:
        yield chunk(None, use=protocol.usage(ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens))
    yield {"data": "[DONE]"}


@post("/v1/completions", opt={"auth": AUTH_API}, status_code=HTTP_200_OK)
async def text_completions(request: Request) -> ASGIApp:
    state = app_state(request)
    chat = require_ready(state)
    req = await parse_body(request, protocol.CompletionRequest)
    ex = await chat.start_text(req)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(
            _text_sse(chat, ex, req, include_usage), headers=ex.headers, ping=state.settings.sse_ping_s, sep="\n",
            send_timeout=30, shutdown_grace_period=SSE_SHUTDOWN_GRACE_S,
        )  # fmt: skip
    await _drain(request, chat, ex)
    choices = []
    for c in ex.choices:
        head = c.prompt_text if req.echo else ""
        choices.append((head + c.text, c.finish_reason or "stop", _text_logprobs(chat, req, c, head_only=False)))
    usage = protocol.usage(ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens)
    body = protocol.text_completion(ex.id, ex.model, ex.created, choices, usage)
    return ASGIResponse(body=json.dumps(body, ensure_ascii=False).encode(), headers=ex.headers,
                        media_type="application/json")


def _text_logprobs(chat: ChatService, req: Any, c: Any, *, head_only: bool) -> dict[str, Any] | None:
    """Legacy logprobs of one choice: the echoed prompt's tokens (the first without a logprob),
    then the generated ones; ``head_only``: just the prompt's (a stream's first chunk)."""
    if req.logprobs is None:
        return None
    entries: list[tuple[str, float | None, dict[str, float] | None]] = []
    if req.echo:
        entries.append((chat.engine.detokenize(c.prompt_ids[:1]), None, None))
        entries += [protocol.legacy_entry(e) for e in c.prompt_logprobs or []]
    if not head_only:
        entries += [protocol.legacy_entry(e) for e in c.logprobs or []]
    return protocol.text_logprobs(entries)


async def _text_sse(chat: ChatService, ex: Any, req: Any, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    def data(obj: dict[str, Any]) -> dict[str, str]:
        return {"data": json.dumps(obj, ensure_ascii=False)}

    echoed: set[int] = set()
    offsets = {c.index: len(c.prompt_text) if req.echo else 0 for c in ex.choices}
    try:
        async for d in chat.run(ex):
            c = ex.choices[d.index]
            if req.echo and c.index not in echoed:  # the prompt first, with its logprobs
                echoed.add(c.index)
                yield data(protocol.text_chunk(ex.id, ex.model, ex.created, c.index, c.prompt_text,
                                               logprobs=_text_logprobs(chat, req, c, head_only=True)))  # fmt: skip
            lp = None
            if req.logprobs is not None and d.logprobs:
                lp = protocol.text_logprobs([protocol.legacy_entry(e) for e in d.logprobs], offsets[c.index])
            offsets[c.index] += len(d.text)
            yield data(protocol.text_chunk(ex.id, ex.model, ex.created, c.index, d.text, logprobs=lp))
    except APIError as e:
        yield data(body_for(e))
        yield {"data": "[DONE]"}
        return
    for c in ex.choices:
        if req.echo and c.index not in echoed:
            yield data(protocol.text_chunk(ex.id, ex.model, ex.created, c.index, c.prompt_text,
                                           logprobs=_text_logprobs(chat, req, c, head_only=True)))  # fmt: skip
        yield data(protocol.text_chunk(ex.id, ex.model, ex.created, c.index, "", c.finish_reason or "stop"))
    if include_usage:
        use = protocol.usage(ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens)
        yield data(protocol.text_chunk(ex.id, ex.model, ex.created, None, use=use, include_usage=True))
    yield {"data": "[DONE]"}


@post("/tokenize", opt={"auth": AUTH_API}, status_code=HTTP_200_OK)
async def tokenize(request: Request) -> dict[str, Any]:
    """vLLM's tokenizer endpoint (lm-evaluation-harness's ``remote`` tokenizer uses it): a text
    is tokenized as /v1/completions tokenizes a prompt (special tokens parsed; BOS when the
    vocabulary asks and ``add_special_tokens``); messages as /v1/chat/completions renders them."""
    chat = require_ready(app_state(request))
    req = await parse_body(request, protocol.TokenizeRequest)
    if req.prompt is not None:
        tokens = chat.engine.tokenize_raw(req.prompt, add_special=req.add_special_tokens)
    else:
        msgs = [{"role": m.role if m.role != "developer" else "system", "content": m.text(i)}
                for i, m in enumerate(req.messages or [])]  # fmt: skip
        tokens = chat.engine.tokenize(chat.template.render_segments(msgs, req.add_generation_prompt))
    return {"count": len(tokens), "max_model_len": chat.engine.n_ctx_seq, "tokens": tokens}


@post("/detokenize", opt={"auth": AUTH_API}, status_code=HTTP_200_OK)
async def detokenize(request: Request) -> dict[str, Any]:
    chat = require_ready(app_state(request))
    req = await parse_body(request, protocol.DetokenizeRequest)
    bad = next((t for t in req.tokens if not 0 <= t < chat.engine.n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is not in the model's vocabulary", param="tokens")
    return {"prompt": chat.engine.detokenize(req.tokens)}


@get("/tokenizer_info", opt={"auth": AUTH_API})
async def tokenizer_info(request: Request) -> dict[str, Any]:
    chat = require_ready(app_state(request))
    t = chat.template
    return {"tokenizer_class": "llama.cpp", "eos_token": t.eos_token or None, "bos_token": t.bos_token or None,
            "pad_token": None, "chat_template": t.source, "model_max_length": chat.engine.n_ctx_seq}  # fmt: skip


HANDLERS = [chat_completions, text_completions, tokenize, detokenize, tokenizer_info]
