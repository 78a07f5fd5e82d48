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
The shared package's own errors (`adapter_chat.errors`, which know no HTTP) become these through
one table, `DOMAIN_ERRORS`, looked up by `from_domain`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapter_chat.errors import EngineBusy, EngineNotReady


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


# domain error -> the APIError the client sees; the first class in the error's MRO found here wins.
# The app registers an exception handler for each key; any other error is a bare 500 there too.
DOMAIN_ERRORS: dict[type[Exception], Callable[[Any], APIError]] = {
    EngineBusy: lambda e: QueueFull(str(e), retry_after=e.retry_after),
    EngineNotReady: lambda e: ServiceUnavailable(str(e)),
}


def from_domain(exc: Exception) -> APIError:
    """The APIError for a domain error; an unmapped one becomes a bare 500 (no detail to the client)."""
    for cls in type(exc).__mro__:
        make = DOMAIN_ERRORS.get(cls)
        if make is not None:
            return make(exc)
    return EngineFailure("internal server error")
