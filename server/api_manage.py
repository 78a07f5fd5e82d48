"""The service endpoints: models, adapters (list, reload, upload), feedback, runs, health, metrics.

Thin glue over the adapter pool, the routes, the conversation log and the metrics. Admin-only
endpoints (reload, upload) declare `AUTH_ADMIN`; `/health`, `/ready` and (optionally) `/metrics`
are public.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from litestar import Request, Response, get, post
from litestar.params import FromPath
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_503_SERVICE_UNAVAILABLE

from adapter_chat import db
from adapter_chat.records import TrainerRun
from adapter_chat.store import ConversationLog, read_trainer_runs
from server import adapter_upload, protocol
from server.chat import BASE_ALIASES
from server.errors import NotFound, mapped
from server.http_common import AUTH_ADMIN, AUTH_API, AUTH_PUBLIC, AppState, app_state, parse_body, parse_query, require_ready
from server.routes import RouteTable

log = logging.getLogger(__name__)


@get("/v1/models", opt={"auth": AUTH_API})
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _model_cards(app_state(request))}


@get("/v1/models/{model_id:str}", opt={"auth": AUTH_API})
async def retrieve_model(request: Request, model_id: FromPath[str]) -> dict[str, Any]:
    state = app_state(request)
    wanted = state.settings.served_model_name if model_id in BASE_ALIASES else model_id
    for card in _model_cards(state):
        if card["id"] == wanted:
            return card
    shown = model_id[:80] + ("..." if len(model_id) > 80 else "")
    raise NotFound(f"The model {shown!r} does not exist; GET /v1/models lists the models this server serves",
                   param="model")


def _model_cards(state: AppState) -> list[dict[str, Any]]:
    chat = require_ready(state)
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
    chat = require_ready(app_state(request))
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
    state = app_state(request)
    chat = require_ready(state)
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
    state = app_state(request)
    chat = require_ready(state)
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
    state = app_state(request)
    require_ready(state)
    fb = await parse_body(request, protocol.FeedbackRequest)
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
    q = parse_query(request, protocol.RunsQuery)
    rows = await asyncio.to_thread(_trainer_runs, app_state(request).settings.runs_target, q.limit, q.adapter)
    return {"object": "list", "data": [protocol.trainer_run(r) for r in rows]}


def _trainer_runs(target: db.Target, limit: int, adapter: str | None) -> list[TrainerRun]:
    return read_trainer_runs(target, limit=limit, adapter=adapter)


@get("/health", opt={"auth": AUTH_PUBLIC})
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", opt={"auth": AUTH_PUBLIC})
async def ready(request: Request) -> Response:
    state = app_state(request)
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
    state = app_state(request)
    body = await asyncio.to_thread(state.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


HANDLERS = [list_models, retrieve_model, list_adapters, reload_adapters, upload_adapter_version, feedback,
            list_runs, health, ready, metrics]
