"""What every HTTP handler module shares: the app state, the access levels, body parsing.

Owns `AppState` (everything the handlers use, built by the app's lifespan), the three access
levels a handler declares in `opt={"auth": ...}`, `require_ready` (503 while the model loads or the
server drains), and turning a JSON body or a query string into a pydantic request with an
OpenAI-shaped 400 naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from pydantic import BaseModel, ValidationError

from adapter_chat.engine import Engine
from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.store import ConversationLog
from server import protocol
from server.adapter_pool import AdapterPool
from server.chat import ChatService
from server.errors import InvalidRequest, ServiceUnavailable
from server.metrics import Metrics
from server.settings import Settings

AUTH_PUBLIC, AUTH_API, AUTH_ADMIN = "public", "api", "admin"


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


def app_state(request: Request | ASGIConnection) -> AppState:
    """The state the app was built with (`create_app`)."""
    return request.app.state["app"]


def require_ready(state: AppState) -> ChatService:
    """The chat service, or a 503 while the model loads or the server drains."""
    if state.draining:
        raise ServiceUnavailable("the server is shutting down")
    if state.chat is None or state.engine is None or not state.engine.alive:
        raise ServiceUnavailable("the model is not loaded yet; retry shortly")
    return state.chat


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body as `model`; a 400 that says what to fix otherwise."""
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


def parse_query(request: Request, model: type[BaseModel]) -> Any:
    """The query string as `model`; a 400 naming the parameter otherwise."""
    try:
        return model.model_validate(dict(request.query_params.items()))
    except ValidationError as e:
        message, param = protocol.describe_validation_error(e)
        raise InvalidRequest(message, param=param) from None
