"""The HTTP layer: `create_app(settings)` builds the Litestar app from the handler modules.

Owns the app's assembly: the lifespan (load the model, open the conversation log, scan adapters,
start the watcher, and close them all in `finally`), the auth guard, the exception handlers
(every error leaves as OpenAI's error body through this one set) and the playground's static
files. The handlers are thin glue in `server/api_generation.py` (completions, tokenize) and
`server/api_manage.py` (models, adapters, feedback, runs, health, metrics); what they share is
`server/http_common.py`. Each handler declares `opt={"auth": ...}`: "public", "api" or "admin"; the
guard enforces it, and the test suite fails on a handler without a decision.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import HTTPException, NotFoundException
from litestar.handlers.base import BaseRouteHandler
from litestar.router import Router
from litestar.static_files import create_static_files_router

from adapter_chat.chat_template import ChatTemplate
from adapter_chat.engine import Engine, EngineConfig
from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.store import ConversationLog
from server import api_generation, api_manage
from server.adapter_pool import AdapterPool
from server.chat import ChatService
from server.errors import (
    DOMAIN_ERRORS,
    APIError,
    AuthenticationFailed,
    PermissionDenied,
    body_for,
    error_body,
    from_domain,
)
from server.http_common import AUTH_ADMIN, AUTH_API, AUTH_PUBLIC, AppState, app_state
from server.metrics import Metrics
from server.routes import RouteTable
from server.settings import Settings

log = logging.getLogger(__name__)

PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"
# The playground page holds no data but keeps an API key in the browser: only our own files may run.
PLAYGROUND_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


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
    settings: Settings = app_state(connection).settings
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
        message = f"request body too large: the limit is {app_state(request).settings.max_body_bytes} bytes"
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
        route_handlers=[*api_generation.HANDLERS, *api_manage.HANDLERS, playground_router()],
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


__all__ = ["AUTH_ADMIN", "AUTH_API", "AUTH_PUBLIC", "AppState", "auth_guard", "create_app"]
