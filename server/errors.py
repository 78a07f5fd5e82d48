"""Typed errors raised by the services, and their one mapping to OpenAI-shaped HTTP errors.

    APIError                      status  type
    ├── InvalidRequest            400     invalid_request_error   (param names the field)
    │   ├── Unsupported           400     invalid_request_error   (n, tools, images, ...)
    │   └── ContextOverflow       400     invalid_request_error   (says both numbers)
    ├── AuthenticationFailed      401     authentication_error
    ├── PermissionDenied          403     permission_error        (admin endpoints)
    ├── NotFound                  404     not_found_error         (model, route, adapter, response id)
    ├── Conflict                  409     conflict_error          (the server cannot change that state)
    ├── PayloadTooLarge           413     invalid_request_error
    ├── QueueFull                 429     rate_limit_error        (Retry-After)
    ├── ServiceUnavailable        503     service_unavailable     (not ready, draining)
    └── EngineFailure             500     server_error            (no detail to the client)

Services raise these; `error_body` and `to_response` turn them into HTTP; nothing else does.
The domain's own errors, which know no HTTP (the engine's, the adapter registry's, grammars, chat
templates, tools, the routes file), become these through one table, `DOMAIN_ERRORS`, looked up by
`from_domain` (httpx's `_exceptions.py` mapping is the model). A call site that knows which request
field the failing input came from says so with `mapped(param=..., context=...)`; anywhere else the
app's handler maps the error the same way, without a field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from adapter_chat.chat_template import ChatTemplateError
from adapter_chat.errors import EngineBusy, EngineNotReady
from adapter_chat.registry import RegistryError
from adapter_chat.sampling import GrammarError
from server.routes import RoutesFileError
from server.tools import ToolError


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unsupported(InvalidRequest):
    code = "unsupported"


class ContextOverflow(InvalidRequest):
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"This model's context is {n_ctx} tokens, but the prompt has {prompt_tokens} tokens and "
            f"max_tokens asks for {max_tokens} more ({prompt_tokens + max_tokens} in total). "
            "Shorten the messages or lower max_tokens.",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class Conflict(APIError):
    status = 409
    type = "conflict_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class QueueFull(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class EngineFailure(APIError):
    status = 500
    type = "server_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def body_for(exc: APIError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, exc.param, exc.code)


# How a domain error becomes an APIError: (the error, its message, the request field) -> APIError.
Mapper = Callable[[Any, str, "str | None"], APIError]


def _as(api: type[APIError]) -> Mapper:
    """The error's message as an `api`, naming the field the error names itself (a ToolError's
    `param`) or else the call site's."""
    return lambda exc, message, param: api(message, param=getattr(exc, "param", None) or param)


# domain error -> the APIError the client sees; the first class in the error's MRO found here wins.
# The app registers an exception handler for each key; any other error is a bare 500 there too.
DOMAIN_ERRORS: dict[type[Exception], Mapper] = {
    EngineBusy: lambda e, message, param: QueueFull(message, retry_after=e.retry_after),
    EngineNotReady: lambda e, message, param: ServiceUnavailable(message),
    GrammarError: _as(InvalidRequest),  # a grammar or JSON schema llama.cpp cannot compile
    ToolError: _as(InvalidRequest),  # malformed tools, tool_choice or tool message
    ChatTemplateError: _as(InvalidRequest),  # the messages cannot be rendered
    RegistryError: _as(NotFound),  # no such adapter or version
    RoutesFileError: _as(Conflict),  # the server keeps the routes it has
}


def from_domain(exc: Exception, *, param: str | None = None, context: str | None = None) -> APIError:
    """The APIError for a domain error: its message after `context` (what was being done), naming
    the request field `param`. An unmapped error becomes a bare 500 (no detail to the client)."""
    message = f"{context}: {exc}" if context else str(exc)
    for cls in type(exc).__mro__:
        make = DOMAIN_ERRORS.get(cls)
        if make is not None:
            return make(exc, message, param)
    return EngineFailure("internal server error")


@contextmanager
def mapped(param: str | None = None, *, context: str | None = None) -> Iterator[None]:
    """Inside the block, a domain error in `DOMAIN_ERRORS` leaves as its APIError (see
    `from_domain`); anything else passes unchanged."""
    try:
        yield
    except tuple(DOMAIN_ERRORS) as exc:
        raise from_domain(exc, param=param, context=context) from None
