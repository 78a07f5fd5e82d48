"""The engine: the only server module that imports llama_cpp.

Owns the base model, one llama.cpp context with `parallel` sequence slots, the loaded LoRA
adapters, native sampler chains, and the scheduler thread that drives them all.

Interface (what the rest of the server sees)::

    engine = Engine(EngineConfig(...)); engine.start()
    tokens = engine.tokenize(segments)                   # template text parsed for special tokens,
                                                         # message content never
    handle = await engine.load_adapter(path)             # LoraHandle; free with free_adapter()
    stream = engine.submit(tokens, params, adapters=((handle, 1.0),))
    async for event in stream: ...                       # TokenEvent: text deltas, then a final one
    stream.cancel()                                      # frees the slot at the next step

Scheduling (continuous batching per adapter set): every step puts into one `llama_batch` the
next token of each running sequence that shares the context's current adapter set, plus a bounded
chunk of pending prompt tokens (chunked prefill). Sequences under another adapter set wait for their
group's turn; turns rotate after `turn_steps` steps when other groups wait. Each slot remembers the
tokens in its KV cache and the adapter set they were computed under; a new request takes the free
slot with the longest common prefix under the same adapter set, so KV is never reused across sets.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import llama_cpp._logger as llama_logger
import llama_cpp.llama_cpp as C

from server.chat_template import Segment
from server.errors import QueueFull, ServiceUnavailable

log = logging.getLogger(__name__)

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed
PENALTY_LAST_N = 64
PREFIX_WORTH_TOKENS = 64  # a cached prefix this long outweighs keeping adapter groups contiguous
# Copy another slot's prefix when that saves more prefill than the copy costs. llama.cpp copies the
# donor's whole KV buffer: bench/kv_copy_cost.py measured +2 ms on the next decode for 1,024 tokens
# per slot and +6 ms for 4,096 (SmolLM2-135M), i.e. about one prefilled token per 512-1,024 tokens
# of context per slot; the bar below keeps a wide margin.
SHARE_WORTH_TOKENS = 16
SHARE_CTX_PER_TOKEN = 256


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    n_ctx: int = 2048  # per sequence
    parallel: int = 4
    n_threads: int = 2
    n_batch: int = 512
    queue_max: int = 64
    turn_steps: int = 48  # steps an adapter group keeps the context while others wait
    request_timeout_s: float = 300.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoraHandle:
    """A LoRA adapter loaded into llama.cpp. `id` is unique for the engine's lifetime."""

    id: int
    path: Path
    ptr: Any = field(repr=False, compare=False)


@dataclass(slots=True)
class TokenEvent:
    """A piece of generated text; the final event has `finish_reason` (or `error`) and usage."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "timeout" on the final event
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class EngineObserver(Protocol):
    """Hooks for metrics; the engine calls them from its thread (keep them cheap)."""

    def on_step(self, batch_tokens: int, decode_seqs: int, switched: bool) -> None: ...
    def on_admit(self, queue_wait_s: float, cached_tokens: int) -> None: ...
    def on_turn_end(self, steps: int) -> None: ...
    def on_prefix_copy(self, tokens: int) -> None: ...


class _NullObserver:
    def on_step(self, batch_tokens: int, decode_seqs: int, switched: bool) -> None:
        pass

    def on_admit(self, queue_wait_s: float, cached_tokens: int) -> None:
        pass

    def on_turn_end(self, steps: int) -> None:
        pass

    def on_prefix_copy(self, tokens: int) -> None:
        pass


AdapterSet = tuple[tuple[int, float], ...]


class GenerationStream:
    """The caller's end of one request: an async iterator of TokenEvents, and cancel()."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.cancelled = False
        self._done = False
        self._engine: Engine | None = None

    def _deliver(self, event: TokenEvent) -> None:  # event loop thread
        self._queue.put_nowait(event)

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next scheduler step."""
        if not self._done and not self.cancelled:
            self.cancelled = True
            if self._engine is not None:
                self._engine._wake.set()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if event.final:
                self._done = True
                return


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    adapters: AdapterSet
    handles: tuple[LoraHandle, ...]
    stream: GenerationStream
    submitted: float = field(default_factory=time.monotonic)


class _Running:
    """Per-sequence generation state, owned by the scheduler thread."""

    def __init__(self, req: _Request, chain: Any, n_cached: int) -> None:
        self.req = req
        self.chain = chain
        self.n_fed = n_cached  # prompt tokens already in KV
        self.n_cached = n_cached
        self.next_token: int | None = None  # sampled, not yet decoded
        self.n_generated = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self.emitted = 0
        self.deadline = time.monotonic() + 0.0


@dataclass
class _Slot:
    idx: int
    kv_tokens: list[int] = field(default_factory=list)
    kv_key: AdapterSet = ()
    run: _Running | None = None
    last_used: float = 0.0


def _deliver_all(items: list[tuple[GenerationStream, TokenEvent]]) -> None:  # event loop thread
    for stream, event in items:
        stream._deliver(event)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Owns the llama.cpp model, context, adapters and the scheduler thread."""

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None) -> None:
        self.config = config
        self.observer = observer or _NullObserver()
        self._pending: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._ctx_key: AdapterSet | None = None
        self._group_steps = 0
        self._group_last_ran: dict[AdapterSet, float] = {}
        self.heartbeat = time.monotonic()
        self._outbox: list[tuple[GenerationStream, TokenEvent]] = []
        self.model = None
        self.ctx = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the model and start the scheduler thread (blocking; call off the event loop)."""
        cfg = self.config
        llama_logger.set_verbose(False)
        C.llama_backend_init()
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = C.llama_model_load_from_file(str(cfg.model_path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load the model {cfg.model_path}")
        self.model = model
        self.vocab = C.llama_model_get_vocab(model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        cparams = C.llama_context_default_params()
        cparams.n_ctx = cfg.n_ctx * cfg.parallel
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        cparams.n_seq_max = cfg.parallel
        cparams.n_threads = cfg.n_threads
        cparams.n_threads_batch = cfg.n_threads
        cparams.no_perf = True
        # One KV buffer per slot, not one shared buffer: a sequence's cells then sit at the same
        # offsets whether it runs alone or with others, which keeps greedy output batch-invariant
        # (tests/test_engine.py). The price: llama.cpp splits a batch into runs of consecutive
        # sequence ids with equal token counts, one model pass each, so slots are handed out to
        # keep each adapter group on neighbouring ids (_pick_slot).
        cparams.kv_unified = False
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.ctx = ctx
        self.mem = C.llama_get_memory(ctx)
        self.n_ctx_seq = int(C.llama_n_ctx_seq(ctx))
        self.batch = C.llama_batch_init(cfg.n_batch, 0, 1)
        self.slots = [_Slot(i) for i in range(cfg.parallel)]
        self._piece_buf = ctypes.create_string_buffer(256)
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self._thread.start()
        log.info("engine ready: %s, %d slots x %d tokens, %d threads", cfg.model_path.name, cfg.parallel,
                 self.n_ctx_seq, cfg.n_threads)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.ctx is not None:
            C.llama_batch_free(self.batch)
            C.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            C.llama_model_free(self.model)
            self.model = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stuck(self, threshold_s: float = 30.0) -> bool:
        """True when the scheduler thread has not come round its loop for `threshold_s`.

        An idle scheduler still comes round every 0.5 s, and one step (a prefill chunk of at most
        `n_batch` tokens, or an adapter load) takes far less than the threshold, so a stale
        heartbeat means the thread is blocked: in llama.cpp, in a command, or in a deadlock."""
        return self.alive and time.monotonic() - self.heartbeat > threshold_s

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.run is not None)

    # ------------------------------------------------------------------ tokens

    def tokenize(self, segments: Sequence[Segment]) -> list[int]:
        """Template text is parsed for special tokens; message content never is."""
        out: list[int] = []
        for i, seg in enumerate(segments):
            out.extend(self._tokenize(seg.text, add_special=(i == 0 and self.add_bos), special=not seg.content))
        return out

    def tokenize_text(self, text: str) -> list[int]:
        return self._tokenize(text, add_special=False, special=False)

    def _tokenize(self, text: str, *, add_special: bool, special: bool) -> list[int]:
        data = text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace").encode("utf-8")
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, special)
        if n < 0:
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, special)
        return list(buf[:n])

    def _piece(self, token: int) -> bytes:
        n = C.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    # ------------------------------------------------------------------ adapters

    def _call(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to the caller
                fut.set_exception(e)

        self._commands.put(run)
        self._wake.set()
        return fut

    async def load_adapter(self, path: Path) -> LoraHandle:
        """Load a LoRA GGUF into llama.cpp (on the scheduler thread, between steps)."""

        def load() -> LoraHandle:
            ptr = C.llama_adapter_lora_init(self.model, str(path).encode())
            if not ptr:
                raise ValueError(f"llama.cpp refused the adapter file {path.name}")
            return LoraHandle(id=next(self._ids), path=path, ptr=ptr)

        return await asyncio.wrap_future(self._call(load))

    def free_adapter(self, handle: LoraHandle) -> None:
        """Free an adapter; the caller guarantees no request holds it."""

        def free() -> None:
            if self._ctx_key is not None and any(h == handle.id for h, _ in self._ctx_key):
                C.llama_set_adapters_lora(self.ctx, None, 0, None)
                self._ctx_key = None
            for slot in self.slots:  # KV computed under it can never be reused again
                if any(h == handle.id for h, _ in slot.kv_key):
                    C.llama_memory_seq_rm(self.mem, slot.idx, -1, -1)
                    slot.kv_tokens = []
                    slot.kv_key = ()
            C.llama_adapter_lora_free(handle.ptr)

        self._call(free)

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapters: Sequence[tuple[LoraHandle, float]] = (),
    ) -> GenerationStream:
        """Queue a request; raises QueueFull when `queue_max` requests already wait."""
        if not self.alive:
            raise ServiceUnavailable("the model is not loaded yet")
        stream = GenerationStream(asyncio.get_running_loop())
        stream._engine = self
        req = _Request(
            prompt=list(prompt),
            params=params,
            adapters=tuple((h.id, float(s)) for h, s in adapters),
            handles=tuple(h for h, _ in adapters),
            stream=stream,
        )
        with self._lock:
            # waiting requests first fill the free slots, then up to queue_max more may wait
            free = sum(1 for s in self.slots if s.run is None)
            if len(self._pending) >= free + self.config.queue_max:
                raise QueueFull(
                    f"the server is at capacity ({self.config.parallel} running, {len(self._pending)} queued); "
                    "retry shortly",
                    retry_after=1,
                )
            self._pending.append(req)
        self._wake.set()
        return stream

    # ------------------------------------------------------------------ scheduler thread

    def _emit(self, stream: GenerationStream, event: TokenEvent) -> None:
        self._outbox.append((stream, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one cross-thread wake-up per loop and step,
        not one per token (each wake-up is a write to the loop's self-pipe)."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationStream, TokenEvent]]] = {}
        for stream, event in self._outbox:
            by_loop.setdefault(stream._loop, []).append((stream, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _loop(self) -> None:
        while not self._stop:
            try:
                worked = self._step()
            except Exception:  # never let the scheduler die silently
                log.exception("engine step failed")
                self._fail_all("internal engine error")
                worked = False
            self._flush()
            self.heartbeat = time.monotonic()
            if not worked:
                self._wake.wait(0.5)
                self._wake.clear()
        for slot in self.slots:
            if slot.run is not None:
                self._finish(slot, error="server shutting down")
        self._flush()

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            cmd()

    def _step(self) -> bool:
        self._run_commands()
        now = time.monotonic()
        for slot in self.slots:
            run = slot.run
            if run is None:
                continue
            if run.req.stream.cancelled:
                self._finish(slot, finish_reason="cancelled")
            elif now > run.deadline:
                self._finish(slot, finish_reason="timeout")
        self._admit()
        runnable = [s for s in self.slots if s.run is not None]
        if not runnable:
            return False
        group = self._choose_group(runnable)
        members = [s for s in runnable if s.run.req.adapters == group]
        switched = group != self._ctx_key
        if switched:
            self._apply_adapters(members[0].run.req)
        return self._decode_group(members, switched)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                free = [s for s in self.slots if s.run is None]
                if not free:
                    return
                req = self._pending.popleft()
            if req.stream.cancelled:
                self._emit(req.stream, TokenEvent(finish_reason="cancelled", prompt_tokens=len(req.prompt)))
                continue
            slot, n_keep = self._pick_slot(free, req)
            chain = self._make_chain(req.params)
            run = _Running(req, chain, n_keep)
            run.deadline = time.monotonic() + self.config.request_timeout_s
            slot.run = run
            slot.last_used = time.monotonic()
            self.observer.on_admit(time.monotonic() - req.submitted, n_keep)

    def _pick_slot(self, free: list[_Slot], req: _Request) -> tuple[_Slot, int]:
        """Choose a free slot for `req`.

        A long cached prefix under the same adapter set wins (a follow-up turn pays only for its new
        message). Otherwise keep each adapter group on neighbouring slot ids: llama.cpp decodes a
        batch in one pass only over consecutive sequence ids, so a group scattered over 0, 2, 4, 6
        costs four passes per step instead of one (measured: 35 ms vs 20 ms per step of 4).
        """
        running = [(s.idx, s.run.req.adapters) for s in self.slots if s.run is not None]

        def contiguity(slot: _Slot) -> tuple[int, int]:
            if any(abs(j - slot.idx) == 1 and key == req.adapters for j, key in running):
                return 1, 0
            others = [abs(j - slot.idx) for j, key in running if key != req.adapters]
            return 0, min(others, default=len(self.slots))  # start a new group far from the others

        def score(slot: _Slot) -> tuple:
            n = _common_prefix(slot.kv_tokens, req.prompt) if slot.kv_key == req.adapters else 0
            if n >= PREFIX_WORTH_TOKENS:
                return (1, n, *contiguity(slot), -slot.last_used)
            return (0, *contiguity(slot), n, -slot.last_used)

        best = max(free, key=score)
        n = _common_prefix(best.kv_tokens, req.prompt) if best.kv_key == req.adapters else 0
        best_len = n
        n_keep = min(best_len, len(req.prompt) - 1)  # the last prompt token is always decoded for logits
        if best.kv_key != req.adapters or n_keep <= 0:
            C.llama_memory_seq_rm(self.mem, best.idx, -1, -1)
            n_keep = 0
        elif not C.llama_memory_seq_rm(self.mem, best.idx, n_keep, -1):
            C.llama_memory_seq_rm(self.mem, best.idx, -1, -1)
            n_keep = 0
        best.kv_tokens = best.kv_tokens[:n_keep]
        best.kv_key = req.adapters
        return best, self._borrow_prefix(best, req, n_keep)

    def _borrow_prefix(self, slot: _Slot, req: _Request, n_keep: int) -> int:
        """Copy a longer prefix of `req.prompt` into `slot` from another slot's KV, if one holds it.

        The common case is a system prompt shared by many conversations: it is computed once and
        copied, not recomputed in every slot. Only KV computed under the same adapter set is ever
        copied. With one KV buffer per slot llama.cpp copies the donor's whole buffer at the start of
        the next llama_decode (before that batch writes anything) and the tail past the prefix is
        dropped here, so a donor that is itself running, or that was just handed to another request,
        still gives the right prefix: its cells below the prefix length are never rewritten.
        """
        limit = len(req.prompt) - 1  # the last prompt token is always decoded for logits
        donor, best = None, n_keep
        for other in self.slots:
            if other is slot or other.kv_key != req.adapters:
                continue
            n = min(_common_prefix(other.kv_tokens, req.prompt), limit)
            if n > best:
                donor, best = other, n
        if donor is None or best - n_keep < max(SHARE_WORTH_TOKENS, self.n_ctx_seq // SHARE_CTX_PER_TOKEN):
            return n_keep
        C.llama_memory_seq_cp(self.mem, donor.idx, slot.idx, -1, -1)
        if not C.llama_memory_seq_rm(self.mem, slot.idx, best, -1):
            C.llama_memory_seq_rm(self.mem, slot.idx, -1, -1)
            slot.kv_tokens = []
            return 0
        slot.kv_tokens = donor.kv_tokens[:best]
        self.observer.on_prefix_copy(best)
        return best

    def _make_chain(self, p: SamplingParams) -> Any:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = lambda s: C.llama_sampler_chain_add(chain, s)  # noqa: E731
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            add(C.llama_sampler_init_penalties(PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty,
                                               p.presence_penalty))
        if p.temperature <= 0.0:
            add(C.llama_sampler_init_greedy())
            return chain
        if p.top_k > 0:
            add(C.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            add(C.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            add(C.llama_sampler_init_min_p(p.min_p, 1))
        add(C.llama_sampler_init_temp(p.temperature))
        add(C.llama_sampler_init_dist(DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF))
        return chain

    def _choose_group(self, runnable: list[_Slot]) -> AdapterSet:
        groups = {s.run.req.adapters for s in runnable}
        cur = self._ctx_key
        if cur in groups and (len(groups) == 1 or self._group_steps < self.config.turn_steps):
            self._group_steps += 1
            return cur
        # the group that has waited longest since it last ran takes the context
        others = [g for g in groups if g != cur] or [cur]
        chosen = min(others, key=lambda g: self._group_last_ran.get(g, 0.0))
        if cur is not None and self._group_steps:
            self.observer.on_turn_end(self._group_steps)
        self._group_steps = 1
        return chosen

    def _apply_adapters(self, req: _Request) -> None:
        n = len(req.handles)
        if n == 0:
            C.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            arr = (C.llama_adapter_lora_p_ctypes * n)(*[h.ptr for h in req.handles])
            scales = (ctypes.c_float * n)(*[s for _, s in req.adapters])
            C.llama_set_adapters_lora(self.ctx, arr, n, scales)
        self._ctx_key = req.adapters

    def _decode_group(self, members: list[_Slot], switched: bool) -> bool:
        b = self.batch
        n = 0
        outputs: list[tuple[_Slot, int]] = []  # (slot, batch index whose logits to sample)
        budget = self.config.n_batch
        # 1. one token for every sequence that is generating
        for slot in members:
            run = slot.run
            if run.next_token is not None and n < budget:
                self._put(b, n, run.next_token, len(slot.kv_tokens), slot.idx, True)
                slot.kv_tokens.append(run.next_token)
                run.next_token = None
                outputs.append((slot, n))
                n += 1
        decode_seqs = len(outputs)
        # 2. chunks of pending prompts with what is left of the budget
        for slot in members:
            run = slot.run
            remaining = len(run.req.prompt) - run.n_fed
            if remaining <= 0 or run.next_token is not None or n >= budget:
                continue
            take = min(remaining, budget - n)
            for j in range(take):
                tok = run.req.prompt[run.n_fed + j]
                last = run.n_fed + j == len(run.req.prompt) - 1
                self._put(b, n, tok, len(slot.kv_tokens), slot.idx, last)
                slot.kv_tokens.append(tok)
                if last:
                    outputs.append((slot, n))
                n += 1
            run.n_fed += take
        if n == 0:
            return False
        b.n_tokens = n
        rc = C.llama_decode(self.ctx, b)
        self._group_last_ran[self._ctx_key] = time.monotonic()
        self.observer.on_step(n, decode_seqs, switched)
        if rc != 0:
            log.error("llama_decode returned %d for a batch of %d tokens", rc, n)
            for slot in members:
                C.llama_memory_seq_rm(self.mem, slot.idx, -1, -1)
                slot.kv_tokens = []
                if slot.run is not None:
                    self._finish(slot, error=f"decode failed ({rc})")
            return True
        for slot, idx in outputs:
            self._sample(slot, idx)
        return True

    @staticmethod
    def _put(b: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _sample(self, slot: _Slot, idx: int) -> None:
        run = slot.run
        tok = C.llama_sampler_sample(run.chain, self.ctx, idx)
        if C.llama_vocab_is_eog(self.vocab, tok):
            self._emit_rest(slot)
            self._finish(slot, finish_reason="stop")
            return
        run.n_generated += 1
        run.text += run.decoder.decode(self._piece(tok))
        stops = run.req.params.stop
        if stops:
            start = max(0, run.emitted - max(len(s) for s in stops))
            hit = min((i for i in (run.text.find(s, start) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                run.text = run.text[:hit]
                self._emit_rest(slot)
                self._finish(slot, finish_reason="stop")
                return
        if run.n_generated >= run.req.params.max_tokens:
            run.text += run.decoder.decode(b"", final=True)
            self._emit_rest(slot)
            self._finish(slot, finish_reason="length")
            return
        hold = self._holdback(run.text, stops) if stops else 0
        upto = len(run.text) - hold
        if upto > run.emitted:
            self._emit(run.req.stream, TokenEvent(text=run.text[run.emitted:upto]))
            run.emitted = upto
        run.next_token = tok

    @staticmethod
    def _holdback(text: str, stops: tuple[str, ...]) -> int:
        """Length of the longest suffix of `text` that could still become a stop string."""
        best = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit_rest(self, slot: _Slot) -> None:
        run = slot.run
        if len(run.text) > run.emitted:
            self._emit(run.req.stream, TokenEvent(text=run.text[run.emitted:]))
            run.emitted = len(run.text)

    def _finish(self, slot: _Slot, *, finish_reason: str | None = None, error: str | None = None) -> None:
        run = slot.run
        slot.run = None
        slot.last_used = time.monotonic()
        C.llama_sampler_free(run.chain)
        self._emit(
            run.req.stream,
            TokenEvent(
                finish_reason=finish_reason,
                error=error,
                prompt_tokens=len(run.req.prompt),
                completion_tokens=run.n_generated,
                cached_tokens=run.n_cached,
            )
        )

    def _fail_all(self, message: str) -> None:
        for slot in self.slots:
            if slot.run is not None:
                C.llama_memory_seq_rm(self.mem, slot.idx, -1, -1)
                slot.kv_tokens = []
                self._finish(slot, error=message)



# ---------------------------------------------------------------------------------------------
# Probe: load an adapter file in a throw-away process, so a file that crashes llama.cpp's loader
# takes down the probe, never the server. `python -m server.engine probe MODEL ADAPTER`.


def probe_adapter(model_path: Path, adapter_path: Path, *, timeout_s: float = 120.0) -> str | None:
    """None when llama.cpp loads the adapter in a child process; otherwise why not."""
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, "-m", "server.engine", "probe", str(model_path), str(adapter_path)],
            capture_output=True, timeout=timeout_s, text=True,
        )
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not finish loading the adapter within {timeout_s:.0f}s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"llama.cpp crashed loading the adapter (signal {-proc.returncode})"
    detail = proc.stdout.strip().splitlines()[-1:] or ["no detail"]
    return f"llama.cpp refused the adapter: {detail[0][:200]}"


def _probe_main(model_path: str, adapter_path: str) -> int:
    llama_logger.set_verbose(False)
    C.llama_backend_init()
    params = C.llama_model_default_params()
    params.n_gpu_layers = 0
    model = C.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        print("base model failed to load")
        return 2
    adapter = C.llama_adapter_lora_init(model, adapter_path.encode())
    if not adapter:
        print("llama_adapter_lora_init returned NULL")
        return 3
    C.llama_adapter_lora_free(adapter)
    C.llama_model_free(model)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        sys.exit(_probe_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m server.engine probe MODEL ADAPTER")
