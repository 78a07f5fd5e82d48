"""The HTTP layer: `create_app(settings)` builds the Litestar app; handlers are thin glue.

The lifespan loads the model, opens the conversation log, scans adapters and starts the watcher,
and closes them all in `finally`. Every error leaves as OpenAI's error body through one set of
exception handlers. Each handler declares `opt={"auth": ...}`: "public", "api" or "admin"; the guard
enforces it, and the test suite fails on a handler without a decision.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import HTTPException, NotFoundException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath
from litestar.response.base import ASGIResponse
from litestar.router import Router
from litestar.static_files import create_static_files_router
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import ASGIApp
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse

from adapter_chat import db
from adapter_chat.chat_template import ChatTemplate
from adapter_chat.engine import Engine, EngineConfig
from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.records import TrainerRun
from adapter_chat.store import ConversationLog, read_trainer_runs
from server import adapter_upload, protocol, tools
from server.adapter_pool import AdapterPool
from server.chat import BASE_ALIASES, ChatService
from server.errors import (
    DOMAIN_ERRORS,
    APIError,
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
    body_for,
    error_body,
    from_domain,
    mapped,
)
from server.metrics import Metrics
from server.routes import RouteTable
from server.settings import Settings

log = logging.getLogger(__name__)

AUTH_PUBLIC, AUTH_API, AUTH_ADMIN = "public", "api", "admin"
PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"
# The playground page holds no data but keeps an API key in the browser: only our own files may run.
PLAYGROUND_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
SSE_SHUTDOWN_GRACE_S = 25.0  # below uvicorn's timeout_graceful_shutdown (30 s, server/__main__.py)


@dataclass
class AppState:
    """Everything the handlers use, built by the lifespan."""

    settings: Settings
    metrics: Metrics
    base: BaseModelInfo | None = None
    engine: Engine | None = None
    pool: AdapterPool | None = None
    chat: ChatService | None = None
    conversation_log: ConversationLog | None = None
    draining: bool = False


def _state(request: Request | ASGIConnection) -> AppState:
    return request.app.state["app"]


def _ready(state: AppState) -> ChatService:
    if state.draining:
        raise ServiceUnavailable("the server is shutting down")
    if state.chat is None or state.engine is None or not state.engine.alive:
        raise ServiceUnavailable("the model is not loaded yet; retry shortly")
    return state.chat


# ------------------------------------------------------------------ auth


def _key_matches(presented: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:  # constant-time per key, and no early exit
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


def _presented_key(connection: ASGIConnection) -> str:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return connection.headers.get("x-api-key", "")


def auth_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    settings: Settings = _state(connection).settings
    level = handler.opt.get("auth")
    if level is None:
        raise PermissionDenied("this endpoint has no access decision")  # fail closed
    if level == "metrics":
        level = AUTH_PUBLIC if settings.metrics_public else AUTH_API
    if level == AUTH_PUBLIC or not (settings.api_keys or settings.admin_keys):
        return
    key = _presented_key(connection)
    if level == AUTH_ADMIN:
        if not settings.admin_keys:
            raise PermissionDenied("admin endpoints are disabled: configure CHAT_ADMIN_KEYS to use them")
        if not key or not _key_matches(key, settings.admin_keys):
            raise AuthenticationFailed("this endpoint needs an admin key: Authorization: Bearer <admin key>")
        return
    if not key or not _key_matches(key, settings.api_keys + settings.admin_keys):
        raise AuthenticationFailed("missing or invalid API key: send Authorization: Bearer <key>")


# ------------------------------------------------------------------ errors


def _api_error(request: Request, exc: APIError) -> Response:
    return Response(body_for(exc), status_code=exc.status, headers=exc.headers)


def _domain_error(request: Request, exc: Exception) -> Response:
    return _api_error(request, from_domain(exc))


def _http_error(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
    if status == 404:
        message = f"no such endpoint: {request.method} {request.url.path[:200]}"
    elif status == 413:
        message = f"request body too large: the limit is {_state(request).settings.max_body_bytes} bytes"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path[:200]}"
    elif status >= 500 and exc.detail == "client disconnected prematurely":  # nobody to answer; not our fault
        log.info("client left while sending its request body: %s %s", request.method, request.url.path[:200])
        message = "client disconnected"
    elif status >= 500:
        log.error("HTTP %d: %s", status, exc.detail)
        message = "internal server error"
    else:
        message = str(exc.detail)
    type_ = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
    return Response(error_body(message, type_), status_code=status, headers=getattr(exc, "headers", None) or {})


def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(error_body("internal server error", "server_error"), status_code=500)


# ------------------------------------------------------------------ body parsing


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the body is not valid JSON: {str(e)[:120]}") from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = protocol.describe_validation_error(e)
        raise InvalidRequest(message, param=param) from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None


def _query(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(dict(request.query_params.items()))
    except ValidationError as e:
        message, param = protocol.describe_validation_error(e)
        raise InvalidRequest(message, param=param) from None


# ------------------------------------------------------------------ handlers


@post("/v1/chat/completions", opt={"auth": AUTH_API}, status_code=HTTP_200_OK)
async def chat_completions(request: Request) -> ASGIApp:
    state = _state(request)
    chat = _ready(state)
    req = await _parse(request, protocol.ChatCompletionRequest)
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
    state = _state(request)
    chat = _ready(state)
    req = await _parse(request, protocol.CompletionRequest)
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
    chat = _ready(_state(request))
    req = await _parse(request, protocol.TokenizeRequest)
    if req.prompt is not None:
        tokens = chat.engine.tokenize_raw(req.prompt, add_special=req.add_special_tokens)
    else:
        msgs = [{"role": m.role if m.role != "developer" else "system", "content": m.text(i)}
                for i, m in enumerate(req.messages or [])]  # fmt: skip
        tokens = chat.engine.tokenize(chat.template.render_segments(msgs, req.add_generation_prompt))
    return {"count": len(tokens), "max_model_len": chat.engine.n_ctx_seq, "tokens": tokens}


@post("/detokenize", opt={"auth": AUTH_API}, status_code=HTTP_200_OK)
async def detokenize(request: Request) -> dict[str, Any]:
    chat = _ready(_state(request))
    req = await _parse(request, protocol.DetokenizeRequest)
    bad = next((t for t in req.tokens if not 0 <= t < chat.engine.n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is not in the model's vocabulary", param="tokens")
    return {"prompt": chat.engine.detokenize(req.tokens)}


@get("/tokenizer_info", opt={"auth": AUTH_API})
async def tokenizer_info(request: Request) -> dict[str, Any]:
    chat = _ready(_state(request))
    t = chat.template
    return {"tokenizer_class": "llama.cpp", "eos_token": t.eos_token or None, "bos_token": t.bos_token or None,
            "pad_token": None, "chat_template": t.source, "model_max_length": chat.engine.n_ctx_seq}  # fmt: skip


@get("/v1/models", opt={"auth": AUTH_API})
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _model_cards(_state(request))}


@get("/v1/models/{model_id:str}", opt={"auth": AUTH_API})
async def retrieve_model(request: Request, model_id: FromPath[str]) -> dict[str, Any]:
    state = _state(request)
    wanted = state.settings.served_model_name if model_id in BASE_ALIASES else model_id
    for card in _model_cards(state):
        if card["id"] == wanted:
            return card
    shown = model_id[:80] + ("..." if len(model_id) > 80 else "")
    raise NotFound(f"The model {shown!r} does not exist; GET /v1/models lists the models this server serves",
                   param="model")


def _model_cards(state: AppState) -> list[dict[str, Any]]:
    chat = _ready(state)
    base = state.settings.served_model_name
    cards = [protocol.model_card(base, "local", kind="base")]
    for name, route in chat.routes.routes.items():
        cards.append(protocol.model_card(
            name, "route", parent=base, kind="route", description=route.description,
            paths=[p for p, ok in (("prompt", route.has_prompt_path), ("finetuned", route.has_finetuned_path)) if ok],
            split=route.split, adapters=[a.model_dump() for a in route.adapters],
        ))  # fmt: skip
    for name, versions in sorted(chat.pool.available.items()):
        current = chat.pool.current[name]
        cards.append(protocol.model_card(name, "adapter", parent=base, kind="adapter", version=current))
        for v in sorted(versions):
            cards.append(protocol.model_card(f"{name}@{v}", "adapter", parent=base, kind="adapter", version=v))
    return cards


@get("/v1/adapters", opt={"auth": AUTH_API})
async def list_adapters(request: Request) -> dict[str, Any]:
    chat = _ready(_state(request))
    pool = chat.pool
    out = []
    for name, versions in sorted(pool.available.items()):
        out.append({
            "name": name, "current": pool.current[name],
            "versions": [versions[v].manifest.model_dump() for v in sorted(versions)],
            "loaded": [k for k in pool.loaded_keys if k.startswith(f"{name}@")],
        })  # fmt: skip
    return {"object": "list", "data": out, "refused": pool.refused}


@post("/v1/adapters/reload", opt={"auth": AUTH_ADMIN}, status_code=HTTP_200_OK)
async def reload_adapters(request: Request) -> dict[str, Any]:
    """Rescan the adapters and reload the routes file. The routes are checked first: a bad file
    changes nothing (409 naming the route at fault), the running routes and adapters stay."""
    state = _state(request)
    chat = _ready(state)
    routes_path = state.settings.routes_path
    with mapped(context="nothing was reloaded, the routes file is invalid"):
        routes = await asyncio.to_thread(RouteTable.load, routes_path, state.settings.prompts_dir)
    summary = await chat.pool.reload()
    chat.routes = routes
    summary["routes"] = sorted(chat.routes.routes)
    return summary


@post("/v1/adapters/{name:str}/versions", opt={"auth": AUTH_ADMIN}, status_code=HTTP_201_CREATED,
      request_max_body_size=None)  # the upload's own limit (CHAT_MAX_ADAPTER_UPLOAD_BYTES) applies as it streams
async def upload_adapter_version(request: Request, name: FromPath[str]) -> dict[str, Any]:
    """Publish the LoRA GGUF in the body as the next version of ``name`` (admin): the HTTP twin of
    ``python -m trainer import``. Query: ``sha256`` (checked), ``scale``, ``note``."""
    state = _state(request)
    chat = _ready(state)
    s = state.settings
    assert state.base is not None
    req = adapter_upload.UploadRequest.parse(name, dict(request.query_params))
    folder = adapter_upload.writable_folder(s.adapters_dir)
    path, sha = await adapter_upload.receive(request.stream(), folder, limit=s.max_adapter_upload_bytes,
                                             announced=request.content_length)  # fmt: skip
    manifest = await asyncio.to_thread(adapter_upload.publish, s.adapters_dir, path, sha, req, state.base,
                                       n_gpu_layers=s.n_gpu_layers)  # fmt: skip
    await chat.pool.reload()
    key = f"{req.name}@{manifest.version}"
    served = manifest.version in chat.pool.available.get(req.name, {})
    log.info("adapter uploaded and published: %s (sha256 %s..., served: %s)", key, sha[:12], served)
    return {"object": "adapter.version", "id": key, "name": req.name, "version": manifest.version, "sha256": sha,
            "served": served, "refused": chat.pool.refused.get(key), "manifest": manifest.model_dump()}  # fmt: skip


@post("/v1/feedback", opt={"auth": AUTH_API}, status_code=HTTP_200_OK)
async def feedback(request: Request) -> dict[str, Any]:
    state = _state(request)
    _ready(state)
    fb = await _parse(request, protocol.FeedbackRequest)
    clog = state.conversation_log
    if clog is None:
        raise NotFound("the conversation log is switched off on this server", param="response_id",
                       code="response_not_found")
    row = await asyncio.to_thread(_exchange_route, clog, fb.response_id)
    if row is None:
        raise NotFound(f"no logged response with id {fb.response_id[:128]!r}", param="response_id",
                       code="response_not_found")
    clog.add_feedback(fb.response_id, fb.rating, fb.corrected, fb.comment)
    route, path = row
    if state.chat is not None and state.chat.route_label_known(route):
        rating = {1: "up", 0: "neutral", -1: "down"}[fb.rating]
        state.metrics.feedback.labels(route, path, rating).inc()
    return {"object": "feedback", "response_id": fb.response_id, "rating": fb.rating}


def _exchange_route(clog: ConversationLog, response_id: str) -> tuple[str, str] | None:
    clog.flush()
    return clog.exchange_route(response_id)


@get("/v1/runs", opt={"auth": AUTH_API})
async def list_runs(request: Request) -> dict[str, Any]:
    q = _query(request, protocol.RunsQuery)
    rows = await asyncio.to_thread(_trainer_runs, _state(request).settings.runs_target, q.limit, q.adapter)
    return {"object": "list", "data": [protocol.trainer_run(r) for r in rows]}


def _trainer_runs(target: db.Target, limit: int, adapter: str | None) -> list[TrainerRun]:
    return read_trainer_runs(target, limit=limit, adapter=adapter)


@get("/health", opt={"auth": AUTH_PUBLIC})
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", opt={"auth": AUTH_PUBLIC})
async def ready(request: Request) -> Response:
    state = _state(request)
    problems = []
    if state.draining:
        problems.append("shutting down")
    if state.engine is None or not state.engine.alive:
        problems.append("model not loaded")
    elif state.engine.stuck(state.settings.stuck_after_s):
        problems.append("generation worker stuck")
    if state.pool is None or not state.pool.scanned:
        problems.append("adapters not scanned")
    if state.conversation_log is not None and not state.conversation_log.accepting:
        # rows are being dropped (docs/conversation-log.md, full disk): send traffic elsewhere
        problems.append("conversation log cannot be written: rows are being dropped")
    if problems:
        return Response({"status": "unavailable", "problems": problems}, status_code=HTTP_503_SERVICE_UNAVAILABLE)
    return Response({"status": "ready", "adapters": len(state.pool.available)})


@get("/metrics", opt={"auth": "metrics"}, media_type="text/plain; version=0.0.4")
async def metrics(request: Request) -> Response:
    state = _state(request)
    body = await asyncio.to_thread(state.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


HANDLERS = [chat_completions, text_completions, tokenize, detokenize, tokenizer_info, list_models, retrieve_model, list_adapters, reload_adapters, upload_adapter_version, feedback, list_runs, health, ready, metrics]


def playground_router() -> Router:
    """GET /playground: the static browser UI (server/playground/). Public: the page holds no data,
    and every call it makes goes to the API with the key the user types in."""

    shipped = frozenset(p.name for p in PLAYGROUND_DIR.iterdir() if p.is_file()) if PLAYGROUND_DIR.is_dir() else ()

    async def shipped_files_only(request: Request) -> None:
        # files are served by exact name; no other spelling (dot segments, NUL bytes) reaches the disk
        name = str(request.path_params.get("file_path", "")).strip("/")
        if name and name not in shipped:
            raise NotFoundException()

    async def security_headers(response: Any) -> Any:
        response.headers.update(PLAYGROUND_HEADERS)
        return response

    return create_static_files_router(
        "/playground", [PLAYGROUND_DIR], html_mode=True, name="playground", opt={"auth": AUTH_PUBLIC},
        cache_control=CacheControlHeader(no_cache=True), before_request=shipped_files_only,
        after_request=security_headers,
    )


# ------------------------------------------------------------------ app factory


def create_app(settings: Settings) -> Litestar:
    """Build the app; the model loads in the lifespan, not at import or here."""
    runs_db = settings.runs_target if settings.log_conversations or settings.trainer_runs_db else None
    state = AppState(settings=settings, metrics=Metrics(runs_db))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        watcher: asyncio.Task | None = None
        try:
            await asyncio.to_thread(_open, state)
            assert state.pool is not None
            await state.pool.reload()
            if settings.adapter_watch_interval_s > 0:
                watcher = asyncio.create_task(state.pool.watch(settings.adapter_watch_interval_s))
            yield
        finally:
            state.draining = True
            if watcher is not None:
                watcher.cancel()
                with suppress(asyncio.CancelledError):
                    await watcher
            await asyncio.to_thread(_close, state)

    cors = CORSConfig(allow_origins=settings.cors_origins) if settings.cors_origins else None
    app = Litestar(
        route_handlers=[*HANDLERS, playground_router()],
        lifespan=[lifespan],
        guards=[auth_guard],
        exception_handlers={APIError: _api_error, **{c: _domain_error for c in DOMAIN_ERRORS},
                            HTTPException: _http_error, Exception: _unexpected},
        request_max_body_size=settings.max_body_bytes,
        cors_config=cors,
        allowed_hosts=settings.allowed_hosts or None,
        openapi_config=None,
        debug=False,
    )
    app.state["app"] = state
    return app


def _open(state: AppState) -> None:
    s = state.settings
    if not s.model.is_file():
        raise RuntimeError(f"model file {s.model} not found: run `make setup` or set CHAT_MODEL")
    state.base = BaseModelInfo.load(s.model)
    engine = Engine(
        EngineConfig(
            model_path=s.model, n_ctx=s.n_ctx, parallel=s.parallel, n_threads=s.n_threads, n_batch=s.n_batch, lanes=s.lanes,
            queue_max=s.queue_max, request_timeout_s=s.request_timeout_s, n_gpu_layers=s.n_gpu_layers,
        ),
        observer=state.metrics,
    )  # fmt: skip
    engine.start()
    state.engine = engine
    state.metrics.bind_queue(lambda: engine.queued)
    state.pool = AdapterPool(s.adapters_dir, engine, state.base, max_loaded=s.max_loaded_adapters,
                             observer=state.metrics)
    routes = RouteTable.load(s.routes_path, s.prompts_dir)
    if s.log_conversations:
        state.conversation_log = ConversationLog(s.log_target, replica=s.replica, retention_days=s.retention_days)
        state.metrics.bind_conversation_log(state.conversation_log)
    state.chat = ChatService(s, engine, state.pool, routes, ChatTemplate.from_model(state.base),
                             state.conversation_log, state.metrics)


def _close(state: AppState) -> None:
    if state.pool is not None and state.engine is not None and state.engine.alive:
        state.pool.close()
    if state.engine is not None:
        state.engine.close()
    if state.conversation_log is not None:
        state.conversation_log.close()
