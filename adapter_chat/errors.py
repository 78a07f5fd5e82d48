"""The shared package's own errors: what the engine raises when it cannot take a request.

They know nothing of HTTP. The server maps them to OpenAI-shaped responses in one table
(`server/errors.py`, `from_domain`); the trainer's evaluation lets them propagate.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's refusals."""


class EngineBusy(EngineError):
    """Every slot is running and the queue is full; the caller may retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineNotReady(EngineError):
    """The model is not loaded yet, or the engine has stopped."""
