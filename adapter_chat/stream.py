"""The hand-off between the engine's scheduler thread and the callers' event loops.

Owns what one request's caller holds (``GenerationStream``: an async iterator of ``TokenEvent``s,
and ``cancel()``), and how the scheduler thread hands events to an event loop (``Mailbox``, one per
loop: one wake-up per scheduler step, not one per token; ``post_all`` groups a step's events by
loop). The engine creates the streams in ``submit`` and posts to them after each step.

The one ``ctypes`` use here is libc's ``write`` called with the GIL held (see ``Mailbox``), not
llama.cpp; the import contract in ``pyproject.toml`` lists this module beside the binding for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from adapter_chat.sampling import TokenLogprob


@dataclass(slots=True)
class TokenEvent:
    """A piece of generated text; the final event has `finish_reason` (or `error`) and usage."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "timeout" on the final event
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # the tokens sampled since the previous event
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (on the first event only)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


# libc write() called through PyDLL keeps the GIL (ctypes.CDLL and os.write release it); see Mailbox.
_write_keeping_gil = ctypes.PyDLL(None).write
_write_keeping_gil.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_write_keeping_gil.restype = ctypes.c_ssize_t


class Mailbox:
    """Hands the scheduler's events to one event loop, one wake-up per step.

    Why not `loop.call_soon_threadsafe`: its wake-up is a socket send, which releases the GIL; the
    woken event loop thread takes the GIL at once and runs its whole per-token HTTP work while the
    scheduler waits to get the GIL back before it can start the next llama_decode (py-spy: 6% of the
    scheduler's time, one stall per step). Here the wake-up byte is written with the GIL held, so the
    event loop runs when the scheduler next lets the GIL go: inside llama_decode, in parallel with it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:  # on the loop's thread
        self._loop_ref = weakref.ref(loop)
        self._items: deque[tuple[GenerationStream, TokenEvent]] = deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)  # a full pipe means the loop has a wake-up pending anyway
        loop.add_reader(self._r, self._drain)
        weakref.finalize(loop, self._close, self._r, self._w)

    @staticmethod
    def _close(r: int, w: int) -> None:
        os.close(r)
        os.close(w)

    def post(self, items: list[tuple[GenerationStream, TokenEvent]]) -> None:  # scheduler thread
        loop = self._loop_ref()
        if loop is None or loop.is_closed():  # nobody is listening any more
            return
        self._items.extend(items)
        _write_keeping_gil(self._w, b"\0", 1)

    def _drain(self) -> None:  # event loop thread
        try:
            os.read(self._r, 4096)
        except BlockingIOError:
            pass
        items = self._items
        while items:
            stream, event = items.popleft()
            stream._deliver(event)


class GenerationStream:
    """The caller's end of one request: an async iterator of TokenEvents, and cancel()."""

    def __init__(self, mailbox: Mailbox, wake: threading.Event) -> None:
        self.mailbox = mailbox
        self._wake = wake  # the scheduler's: a cancel is seen at its next step, not after a timeout
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.cancelled = False
        self._done = False

    def _deliver(self, event: TokenEvent) -> None:  # event loop thread
        self._queue.put_nowait(event)

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next scheduler step."""
        if not self._done and not self.cancelled:
            self.cancelled = True
            self._wake.set()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if event.final:
                self._done = True
                return


def post_all(events: Iterable[tuple[GenerationStream, TokenEvent]]) -> None:
    """Hand one step's events to their event loops: one wake-up per loop (scheduler thread)."""
    by_box: dict[Mailbox, list[tuple[GenerationStream, TokenEvent]]] = {}
    for stream, event in events:
        by_box.setdefault(stream.mailbox, []).append((stream, event))
    for box, items in by_box.items():
        box.post(items)


__all__ = ["GenerationStream", "Mailbox", "TokenEvent", "post_all"]
