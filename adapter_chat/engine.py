"""The engine: generation over llama.cpp for the server and for the trainer's evaluation.

Owns the base model, its lanes (llama.cpp contexts over the shared weights, `parallel` sequence slots
shared out between them), the loaded LoRA adapters, native sampler chains, and the scheduler thread
that drives them all.

Interface (what the rest of the server sees)::

    engine = Engine(EngineConfig(...)); engine.start()
    tokens = engine.tokenize(segments)                   # template text parsed for special tokens,
                                                         # message content never
    handle = await engine.load_adapter(path)             # LoraHandle; free with free_adapter()
    stream = engine.submit(tokens, params, adapters=((handle, 1.0),))
    async for event in stream: ...                       # TokenEvent: text deltas, then a final one
    stream.cancel()                                      # frees the slot at the next step

Scheduling (continuous batching per adapter set, lanes side by side): every step fills, per lane, one
`llama_batch` with the next token of each running sequence that shares the lane's current adapter
set, plus a bounded chunk of pending prompt tokens (chunked prefill); then the lanes' llama_decode
calls run at the same time, the threads split between them. A new request goes to a lane already
running its adapter set, or an idle one, the least loaded first; sequences under another adapter set
in the same lane wait for their group's turn, and turns rotate after `turn_steps` steps when other
groups wait. Each slot remembers the tokens in its KV cache and the adapter set they were computed
under; a new request takes the free slot with the longest common prefix under the same adapter set,
or copies a shared prefix from another slot, so KV is never reused across sets.
The policy (which slot, which donor, which group, which lanes side by side) is pure logic in
`adapter_chat/scheduler.py`; this module carries it out. Each running sequence's text (UTF-8 across
tokens, stop strings, holdback) is `adapter_chat/detokenizer.py`; the hand-off of its events to the
caller's event loop is `adapter_chat/stream.py`; the adapter probe is `adapter_chat/probe.py`.

Over the ~400-line guide on purpose: what is left is the scheduler thread's state machine over the
llama.cpp contexts (admit, plan, decode, sample, finish), which reads best as one piece.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import llama_cpp._logger as llama_logger
import llama_cpp.llama_cpp as C

from adapter_chat import scheduler
from adapter_chat.chat_template import Segment, tokenize_segments
from adapter_chat.detokenizer import IncrementalDetokenizer
from adapter_chat.errors import EngineBusy, EngineNotReady
from adapter_chat.llama_model import load_model
from adapter_chat.llama_vocab import LlamaVocab
from adapter_chat.stream import GenerationStream, Mailbox, TokenEvent, post_all
from adapter_chat.sampling import (
    GrammarSampling,
    SamplingParams,
    TokenLogprob,
    build_chain,
    build_grammar,
    token_logprobs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    n_ctx: int = 2048  # per sequence
    parallel: int = 4
    n_threads: int = 2
    n_batch: int = 512
    queue_max: int = 64
    turn_steps: int = 48  # steps an adapter group keeps a lane while others wait
    request_timeout_s: float = 300.0
    lanes: int = 0  # llama.cpp contexts decoded side by side; 0 = min(2, n_threads, parallel)
    flash_attn: bool = False  # on: greedy output depends on batching and reuse (README, Determinism)
    n_gpu_layers: int = 0  # layers offloaded to a GPU (llama_model_params.n_gpu_layers); 0 = CPU only


@dataclass(frozen=True)
class LoraHandle:
    """A LoRA adapter loaded into llama.cpp. `id` is unique for the engine's lifetime."""

    id: int
    path: Path
    ptr: Any = field(repr=False, compare=False)


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


AdapterSet = scheduler.AdapterSet


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    adapters: AdapterSet
    handles: tuple[LoraHandle, ...]
    stream: GenerationStream
    submitted: float = field(default_factory=time.monotonic)
    after: _Request | None = None
    """Another choice of the same prompt (``n`` > 1): this one is admitted once that one's prompt is
    in the KV cache, so it copies the prompt (``_borrow_prefix``) instead of computing it again."""
    fed: bool = False  # the whole prompt has been put in a batch (and so decoded before the next admit)
    ended: bool = False


class _Running:
    """Per-sequence generation state, owned by the scheduler thread."""

    def __init__(self, req: _Request, chain: Any, grammar: Any, n_cached: int) -> None:
        self.req = req
        self.chain = chain
        self.grammar = grammar  # llama.cpp grammar sampler, or None (sampled by GrammarSampling)
        self.n_fed = n_cached  # prompt tokens already in KV
        self.n_cached = n_cached
        self.next_token: int | None = None  # sampled, not yet decoded
        self.n_generated = 0
        self.detok = IncrementalDetokenizer(req.params.stop or ())
        self.deadline = time.monotonic() + 0.0
        self.logprobs: list[TokenLogprob] | None = [] if req.params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = [] if req.params.prompt_logprobs is not None else None


@dataclass(eq=False)
class _Slot:
    idx: int  # engine-wide slot number
    lane: _Lane
    seq: int  # sequence id inside the lane's context
    kv_tokens: list[int] = field(default_factory=list)
    kv_key: AdapterSet = ()
    run: _Running | None = None
    last_used: float = 0.0
    copy_pending: bool = False  # a seq_cp into this slot runs at its lane's next llama_decode


@dataclass(eq=False)
class _Lane:
    """One llama.cpp context (its own KV cells, adapter set and batch) over the shared model.

    Lanes decode side by side, each on its share of the threads: two adapter groups then run at
    the same time instead of taking turns (bench/engine_mix.py), and a lane running alone gets every
    thread."""

    idx: int
    ctx: Any
    mem: Any
    batch: Any
    slots: list[_Slot] = field(default_factory=list)
    ctx_key: AdapterSet | None = None
    group_steps: int = 0
    group_last_ran: dict[AdapterSet, float] = field(default_factory=dict)
    threads: int = 0


@dataclass
class _Plan:
    """One lane's share of a step: the batch is filled, llama_decode has not run yet."""

    lane: _Lane
    members: list[_Slot]
    outputs: list[tuple[_Slot, int]]
    n_tokens: int
    decode_seqs: int
    switched: bool
    prompt_outputs: list[tuple[_Slot, int, int]] = field(default_factory=list)
    """(slot, batch index, prompt position j): logits that score prompt token j + 1."""


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
        self.heartbeat = time.monotonic()
        self._outbox: list[tuple[GenerationStream, TokenEvent]] = []
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
        self._decoder_pool: ThreadPoolExecutor | None = None
        self.lanes: list[_Lane] = []
        self.slots: list[_Slot] = []
        self.model = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the model, create the lanes' contexts and start the scheduler thread (blocking; call
        off the event loop)."""
        cfg = self.config
        llama_logger.set_verbose(False)
        C.llama_backend_init()
        model = load_model(cfg.model_path, n_gpu_layers=cfg.n_gpu_layers)
        self.model = model
        self.vocab = C.llama_model_get_vocab(model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self._vocab = LlamaVocab(self.vocab)
        n_lanes = cfg.lanes or min(2, cfg.n_threads, cfg.parallel)
        n_lanes = max(1, min(n_lanes, cfg.parallel))
        for li in range(n_lanes):
            n_slots = cfg.parallel // n_lanes + (1 if li < cfg.parallel % n_lanes else 0)
            cparams = C.llama_context_default_params()
            cparams.n_ctx = cfg.n_ctx * n_slots
            cparams.n_batch = cfg.n_batch
            cparams.n_ubatch = cfg.n_batch
            cparams.n_seq_max = n_slots
            cparams.n_threads = cfg.n_threads
            cparams.n_threads_batch = cfg.n_threads
            cparams.no_perf = True
            # One KV buffer per slot, not one shared buffer: a sequence's cells then sit at the same
            # offsets whether it runs alone or with others, which keeps greedy output batch-invariant
            # (tests/test_engine.py). The price: llama.cpp splits a batch into runs of consecutive
            # sequence ids with equal token counts, one model pass each, so slots are handed out to
            # keep each adapter group on neighbouring ids (_pick_slot).
            cparams.kv_unified = False
            # No flash attention by default: llama.cpp's CPU kernel for it is picked by the batch
            # (a tiled F32 GEMM for 64+ query rows, an F16 dot-product loop below, and past 512 KV
            # cells a one-token decode split across the threads), so a position's KV and logits
            # would depend on how many tokens it was decoded with and on the lane's thread count.
            # Reused prefixes and side-by-side lanes would then change greedy answers
            # (tests/test_engine.py). The trainer's evaluation runs without it too, so what is
            # scored is what is served.
            cparams.flash_attn_type = (
                C.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            ctx = C.llama_init_from_model(model, cparams)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a context")
            lane = _Lane(li, ctx, C.llama_get_memory(ctx), C.llama_batch_init(cfg.n_batch, 0, 1), threads=cfg.n_threads)
            lane.slots = [_Slot(len(self.slots) + j, lane, j) for j in range(n_slots)]
            self.slots.extend(lane.slots)
            self.lanes.append(lane)
        self.n_ctx_seq = int(C.llama_n_ctx_seq(self.lanes[0].ctx))
        if n_lanes > 1:
            self._decoder_pool = ThreadPoolExecutor(n_lanes - 1, thread_name_prefix="engine-lane")
        self._piece_buf = ctypes.create_string_buffer(256)
        self._grammar_sampling = GrammarSampling(self.n_vocab)
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self._thread.start()
        log.info(
            "engine ready: %s, %d slots x %d tokens in %d lane(s), %d threads",
            cfg.model_path.name,
            cfg.parallel,
            self.n_ctx_seq,
            n_lanes,
            cfg.n_threads,
        )

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._decoder_pool is not None:
            self._decoder_pool.shutdown(wait=True)
            self._decoder_pool = None
        for lane in self.lanes:
            C.llama_batch_free(lane.batch)
            C.llama_free(lane.ctx)
        self.lanes = []
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
        """The one tokenization (``chat_template.tokenize_segments``), shared with the trainer:
        template text is parsed for special tokens; message content never is."""
        return tokenize_segments(self._vocab, list(segments))

    def tokenize_text(self, text: str) -> list[int]:
        return self._vocab.tokenize(text, add_special=False, parse_special=False)

    def tokenize_raw(self, text: str, *, add_special: bool = True) -> list[int]:
        """A text completion's prompt, as llama-server tokenizes one: special tokens parsed, BOS
        added when the vocabulary asks for it (and ``add_special``)."""
        return self._vocab.tokenize(text, add_special=add_special and self._vocab.add_bos, parse_special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` (any thread: its own buffer, not the scheduler's)."""
        buf = ctypes.create_string_buffer(256)
        out = []
        for t in tokens:
            n = C.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out.append(buf.raw[:n])
        return b"".join(out).decode("utf-8", "replace")

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
            for lane in self.lanes:
                if lane.ctx_key is not None and any(h == handle.id for h, _ in lane.ctx_key):
                    C.llama_set_adapters_lora(lane.ctx, None, 0, None)
                    lane.ctx_key = None
            for slot in self.slots:  # KV computed under it can never be reused again
                if any(h == handle.id for h, _ in slot.kv_key):
                    self._forget(slot)
            C.llama_adapter_lora_free(handle.ptr)

        self._call(free)

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapters: Sequence[tuple[LoraHandle, float]] = (),
    ) -> GenerationStream:
        """Queue a request; raises EngineBusy when `queue_max` requests already wait."""
        return self.submit_choices(prompt, params, adapters, n=1)[0]

    def submit_choices(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapters: Sequence[tuple[LoraHandle, float]] = (),
        *,
        n: int = 1,
    ) -> list[GenerationStream]:
        """Queue ``n`` generations of one prompt (OpenAI's ``n``), one stream each. Choice ``i``
        samples with ``seed + i`` when a seed is given. Choices after the first wait for the
        first's prompt to be in the KV cache and copy it rather than compute it again. Raises
        EngineBusy when the queue has no room for all ``n``."""
        if not self.alive:
            raise EngineNotReady("the model is not loaded yet")
        if n < 1:
            raise ValueError("n must be at least 1")
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = Mailbox(loop)
        reqs: list[_Request] = []
        for i in range(n):
            stream = GenerationStream(mailbox, self._wake)
            p = params if i == 0 or params.seed is None else replace(params, seed=params.seed + i)
            reqs.append(_Request(
                prompt=list(prompt),
                params=p,
                adapters=tuple((h.id, float(s)) for h, s in adapters),
                handles=tuple(h for h, _ in adapters),
                stream=stream,
                after=reqs[0] if i else None,
            ))  # fmt: skip
        with self._lock:
            # waiting requests first fill the free slots, then up to queue_max more may wait
            free = sum(1 for s in self.slots if s.run is None)
            if len(self._pending) + n - 1 >= free + self.config.queue_max:
                raise EngineBusy(
                    f"the server is at capacity ({self.config.parallel} running, {len(self._pending)} queued); "
                    "retry shortly",
                    retry_after=1,
                )
            self._pending.extend(reqs)
        self._wake.set()
        return [r.stream for r in reqs]

    # ------------------------------------------------------------------ scheduler thread

    def _emit(self, stream: GenerationStream, event: TokenEvent) -> None:
        self._outbox.append((stream, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop and step, not one per
        token."""
        if not self._outbox:
            return
        events, self._outbox = self._outbox, []
        post_all(events)

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
        plans = [p for p in (self._plan(lane) for lane in self.lanes) if p is not None]
        if not plans:
            return False
        self._decode(plans)
        return True

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                free = [s for s in self.slots if s.run is None]
                if not free:
                    return
                i = scheduler.admissible(self._pending)
                if i is None:
                    return
                req = self._pending[i]
                del self._pending[i]
            if req.stream.cancelled:
                req.ended = True
                self._emit(req.stream, TokenEvent(finish_reason="cancelled", prompt_tokens=len(req.prompt)))
                continue
            slot, n_keep = self._pick_slot(free, req)
            chain, grammar = self._make_samplers(req.params)
            run = _Running(req, chain, grammar, n_keep)
            run.deadline = time.monotonic() + self.config.request_timeout_s
            slot.run = run
            slot.last_used = time.monotonic()
            self.observer.on_admit(time.monotonic() - req.submitted, n_keep)

    def _pick_slot(self, free: list[_Slot], req: _Request) -> tuple[_Slot, int]:
        """Take the free slot the policy chooses (scheduler.choose_slot) and keep the part of its KV
        that is a prefix of `req.prompt`, or copy a longer one from another slot; returns the slot
        and the prompt tokens already in its KV."""
        if req.params.prompt_logprobs is not None:  # every prompt position's logits are needed
            best = scheduler.choose_scoring_slot(free)
            self._forget(best)
            best.kv_key = req.adapters
            return best, 0
        best, n = scheduler.choose_slot(free, self.slots, self.lanes, req)
        n_keep = min(n, len(req.prompt) - 1)  # the last prompt token is always decoded for logits
        mem = best.lane.mem
        if best.kv_key != req.adapters or n_keep <= 0:
            C.llama_memory_seq_rm(mem, best.seq, -1, -1)
            n_keep = 0
        elif not C.llama_memory_seq_rm(mem, best.seq, n_keep, -1):
            C.llama_memory_seq_rm(mem, best.seq, -1, -1)
            n_keep = 0
        best.kv_tokens = best.kv_tokens[:n_keep]
        best.kv_key = req.adapters
        return best, self._borrow_prefix(best, req, n_keep)

    def _borrow_prefix(self, slot: _Slot, req: _Request, n_keep: int) -> int:
        """Copy a longer prefix of `req.prompt` into `slot` from another slot's KV, if one holds it.

        The common case is a system prompt shared by many conversations: it is computed once and
        copied, not recomputed in every slot. Only KV computed under the same adapter set is ever
        copied. In the same lane llama.cpp copies (`llama_memory_seq_cp`) with one KV buffer per slot
        the donor's whole buffer at the start of the lane's next llama_decode (before that batch
        writes anything) and the tail past the prefix is dropped here, so a donor that is itself
        running, or that was just handed to another request, still gives the right prefix: its cells
        below the prefix length are never rewritten. From another lane the donor's cells are read
        out and written in now (`llama_state_seq_get/set_data`), so the donor's KV must already be
        computed: a slot whose own copy is still pending does not donate across lanes.
        """
        chosen = scheduler.choose_donor(slot, self.slots, req, n_keep, self.n_ctx_seq)
        if chosen is None:
            return n_keep
        donor, best = chosen
        mem = slot.lane.mem
        if donor.lane is slot.lane:
            C.llama_memory_seq_cp(mem, donor.seq, slot.seq, -1, -1)
            slot.copy_pending = True
            ok = C.llama_memory_seq_rm(mem, slot.seq, best, -1)
        else:
            ok = self._copy_across_lanes(donor, slot) and C.llama_memory_seq_rm(mem, slot.seq, best, -1)
        if not ok:
            self._forget(slot)
            return 0
        slot.kv_tokens = donor.kv_tokens[:best]
        self.observer.on_prefix_copy(best)
        return best

    def _copy_across_lanes(self, donor: _Slot, slot: _Slot) -> bool:
        """Replace `slot`'s KV by a copy of `donor`'s, read out of the donor's context."""
        size = C.llama_state_seq_get_size(donor.lane.ctx, donor.seq)
        buf = (ctypes.c_uint8 * size)()
        if C.llama_state_seq_get_data(donor.lane.ctx, buf, size, donor.seq) != size:
            return False
        C.llama_memory_seq_rm(slot.lane.mem, slot.seq, -1, -1)
        return C.llama_state_seq_set_data(slot.lane.ctx, buf, size, slot.seq) > 0

    def _forget(self, slot: _Slot) -> None:
        C.llama_memory_seq_rm(slot.lane.mem, slot.seq, -1, -1)
        slot.kv_tokens = []
        slot.kv_key = ()

    def _make_samplers(self, p: SamplingParams) -> tuple[Any, Any]:
        chain = build_chain(self.vocab, self.n_vocab, p)
        try:
            return chain, build_grammar(self.vocab, p)
        except Exception:
            C.llama_sampler_free(chain)
            raise

    def _apply_adapters(self, lane: _Lane, req: _Request) -> None:
        n = len(req.handles)
        if n == 0:
            C.llama_set_adapters_lora(lane.ctx, None, 0, None)
        else:
            arr = (C.llama_adapter_lora_p_ctypes * n)(*[h.ptr for h in req.handles])
            scales = (ctypes.c_float * n)(*[s for _, s in req.adapters])
            C.llama_set_adapters_lora(lane.ctx, arr, n, scales)
        lane.ctx_key = req.adapters

    def _plan(self, lane: _Lane) -> _Plan | None:
        """Fill `lane`'s batch for this step: one token of every generating sequence of the lane's
        current adapter group, then chunks of that group's pending prompts."""
        runnable = [s for s in lane.slots if s.run is not None]
        if not runnable:
            return None
        group = scheduler.choose_group(lane, runnable, self.config.turn_steps, self.observer.on_turn_end)
        members = [s for s in runnable if s.run.req.adapters == group]
        switched = group != lane.ctx_key
        if switched:
            self._apply_adapters(lane, members[0].run.req)
        b = lane.batch
        n = 0
        outputs: list[tuple[_Slot, int]] = []  # (slot, batch index whose logits to sample)
        prompt_outputs: list[tuple[_Slot, int, int]] = []
        budget = self.config.n_batch
        # 1. one token for every sequence that is generating
        for slot in members:
            run = slot.run
            if run.next_token is not None and n < budget:
                self._put(b, n, run.next_token, len(slot.kv_tokens), slot.seq, True)
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
            scored = run.prompt_logprobs is not None
            for j in range(take):
                pos = run.n_fed + j
                tok = run.req.prompt[pos]
                last = pos == len(run.req.prompt) - 1
                self._put(b, n, tok, len(slot.kv_tokens), slot.seq, last or scored)
                slot.kv_tokens.append(tok)
                if last:
                    outputs.append((slot, n))
                elif scored:
                    prompt_outputs.append((slot, n, pos))
                n += 1
            run.n_fed += take
            if run.n_fed >= len(run.req.prompt):
                run.req.fed = True
        if n == 0:
            return None
        b.n_tokens = n
        return _Plan(lane, members, outputs, n, decode_seqs, switched, prompt_outputs)

    def _decode(self, plans: list[_Plan]) -> None:
        """Run the planned lanes' llama_decode calls, then sample.

        Lanes with similar batches run side by side, the threads split between them: the scheduler
        thread decodes the first lane itself, the others run on the lane pool's threads (llama_decode
        releases the GIL), and every state change stays here. When one lane's batch is much larger
        than another's (a prompt chunk next to a few decode tokens), side by side would leave the
        small lane's core idle while the big one runs on half the threads, so the lanes run one
        after another with all the threads, the small one first."""
        rounds = scheduler.decode_rounds([p.n_tokens for p in plans])
        for members in rounds:
            self._decode_side_by_side([plans[j] for j in members])
            if len(rounds) > 1:
                self._flush()  # the small lane's tokens go out before the big batch runs

    def _decode_side_by_side(self, plans: list[_Plan]) -> None:
        for plan, t in zip(plans, scheduler.thread_shares(self.config.n_threads, len(plans))):
            if plan.lane.threads != t:
                C.llama_set_n_threads(plan.lane.ctx, t, t)
                plan.lane.threads = t
        futures = (
            [self._decoder_pool.submit(C.llama_decode, p.lane.ctx, p.lane.batch) for p in plans[1:]]
            if len(plans) > 1 and self._decoder_pool is not None
            else []
        )
        codes = [C.llama_decode(plans[0].lane.ctx, plans[0].lane.batch)] + [f.result() for f in futures]
        now = time.monotonic()
        for plan, rc in zip(plans, codes):
            lane = plan.lane
            lane.group_last_ran[lane.ctx_key] = now
            for slot in lane.slots:
                slot.copy_pending = False
            self.observer.on_step(plan.n_tokens, plan.decode_seqs, plan.switched)
            if rc != 0:
                log.error("llama_decode returned %d for a batch of %d tokens", rc, plan.n_tokens)
                for slot in plan.members:
                    self._forget(slot)
                    if slot.run is not None:
                        self._finish(slot, error=f"decode failed ({rc})")
                continue
            for slot, idx, pos in plan.prompt_outputs:
                run = slot.run
                run.prompt_logprobs.append(
                    token_logprobs(
                        lane.ctx,
                        idx,
                        self.n_vocab,
                        run.req.prompt[pos + 1],
                        run.req.params.prompt_logprobs,
                        self._piece,
                    )
                )
            for slot, idx in plan.outputs:
                self._sample(slot, idx)

    @staticmethod
    def _put(b: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _sample(self, slot: _Slot, idx: int) -> None:
        run = slot.run
        if run.grammar is None:
            tok = C.llama_sampler_sample(run.chain, slot.lane.ctx, idx)
        else:
            tok = self._grammar_sampling.sample(run.chain, run.grammar, slot.lane.ctx, idx)
        if C.llama_vocab_is_eog(self.vocab, tok):
            self._emit_rest(slot)
            self._finish(slot, finish_reason="stop")
            return
        if run.logprobs is not None:
            run.logprobs.append(
                token_logprobs(slot.lane.ctx, idx, self.n_vocab, tok, run.req.params.logprobs, self._piece)
            )
        run.n_generated += 1
        if run.detok.update(self._piece(tok)):  # a stop string: the text is cut before it
            self._emit_rest(slot)
            self._finish(slot, finish_reason="stop")
            return
        if run.n_generated >= run.req.params.max_tokens:
            run.detok.flush()
            self._emit_rest(slot)
            self._finish(slot, finish_reason="length")
            return
        if delta := run.detok.next_delta():
            self._emit_text(run, delta)
        run.next_token = tok

    @staticmethod
    def _take_prompt_logprobs(run: _Running) -> list[TokenLogprob] | None:
        out, run.prompt_logprobs = run.prompt_logprobs, None
        return out

    @staticmethod
    def _take_logprobs(run: _Running) -> list[TokenLogprob] | None:
        if not run.logprobs:
            return None
        out, run.logprobs = run.logprobs, []
        return out

    def _emit_rest(self, slot: _Slot) -> None:
        if delta := slot.run.detok.next_delta(final=True):
            self._emit_text(slot.run, delta)

    def _emit_text(self, run: _Running, text: str) -> None:
        event = TokenEvent(
            text=text, logprobs=self._take_logprobs(run), prompt_logprobs=self._take_prompt_logprobs(run)
        )
        self._emit(run.req.stream, event)

    def _finish(self, slot: _Slot, *, finish_reason: str | None = None, error: str | None = None) -> None:
        run = slot.run
        slot.run = None
        run.req.ended = True
        slot.last_used = time.monotonic()
        C.llama_sampler_free(run.chain)
        if run.grammar is not None:
            C.llama_sampler_free(run.grammar)
        self._emit(
            run.req.stream,
            TokenEvent(
                finish_reason=finish_reason,
                error=error,
                prompt_tokens=len(run.req.prompt),
                completion_tokens=run.n_generated,
                cached_tokens=run.n_cached,
                logprobs=self._take_logprobs(run),
                prompt_logprobs=self._take_prompt_logprobs(run),
            ),
        )

    def _fail_all(self, message: str) -> None:
        for slot in self.slots:
            if slot.run is not None:
                self._forget(slot)
                self._finish(slot, error=message)
