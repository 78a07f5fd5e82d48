"""The engine's scheduling policy, as pure functions over slot and lane state: no llama.cpp here.

Owns the decisions, not their execution (`adapter_chat/engine.py` does the KV copies, the batches
and the decodes):

- `admissible`: which waiting request is admitted next;
- `choose_slot`: which free slot a request takes (cached prefix, lane fit, neighbouring ids);
- `choose_donor`: whose KV prefix a new request copies instead of computing it;
- `choose_group`: which adapter group runs on a lane this step (turns);
- `decode_rounds` and `thread_shares`: which lanes decode side by side, on how many threads.

Every function reads the state through the small protocols below, so tests drive them with plain
objects (tests/test_scheduler.py) and the engine passes its own slots and lanes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

# What the KV cache was computed under: (loaded adapter's handle id, scale) per adapter, in request
# order. The adapter's identity (name, version, file, sha256: `adapter_chat.identity.AdapterUse`)
# stays above the engine, as vLLM's engine keys by `lora_int_id` under its `LoRARequest`: the
# engine needs only what llama.cpp applies, and a handle id is unique for the engine's lifetime, so
# a reloaded version never matches KV computed under the old one.
AdapterSet = tuple[tuple[int, float], ...]

PREFIX_WORTH_TOKENS = 64  # a cached prefix this long outweighs keeping adapter groups contiguous
# Copy another slot's prefix when that saves more prefill than the copy costs. llama.cpp copies the
# donor's whole KV buffer: bench/kv_copy_cost.py measured +2 ms on the next decode for 1,024 tokens
# per slot and +6 ms for 4,096 (SmolLM2-135M), i.e. about one prefilled token per 512-1,024 tokens
# of context per slot; the bar below keeps a wide margin.
SHARE_WORTH_TOKENS = 16
SHARE_CTX_PER_TOKEN = 256
# From another lane the copy reads out every cell the donor holds: bench/lane_copy_cost.py measured
# 2-13 us per donor token against 2-3 ms to prefill one token, so a copy must save at least one
# token per 128 the donor holds.
CROSS_LANE_TOKENS_PER_TOKEN = 128
# Lanes decode side by side when their batches are alike (tokens within this ratio plus slack), else
# one after another with all the threads (see Engine._decode).
SIDE_BY_SIDE_RATIO = 4
SIDE_BY_SIDE_SLACK = 8


class Request(Protocol):
    prompt: list[int]
    adapters: AdapterSet


class Run(Protocol):
    req: Any  # a Request


class Lane(Protocol):
    idx: int
    slots: Any  # list of Slot
    ctx_key: AdapterSet | None
    group_steps: int
    group_last_ran: dict[AdapterSet, float]


class Slot(Protocol):
    lane: Any  # a Lane
    seq: int
    kv_tokens: list[int]
    kv_key: AdapterSet
    run: Any  # a Run, or None when the slot is free
    last_used: float
    copy_pending: bool


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def admissible(pending: Sequence[Any]) -> int | None:
    """Index of the next waiting request to admit: in order, except that a later choice of one
    prompt (``n`` > 1, ``after`` set) waits until the first choice's prompt is in the KV cache."""
    return next((i for i, r in enumerate(pending)
                 if r.after is None or r.after.fed or r.after.ended or r.stream.cancelled), None)  # fmt: skip


def choose_slot(free: Sequence[Slot], slots: Sequence[Slot], lanes: Sequence[Lane], req: Request) -> tuple[Slot, int]:
    """Choose a free slot for `req`; returns it and the prompt prefix its KV already holds.

    A long cached prefix under the same adapter set wins (a follow-up turn pays only for its new
    message). Otherwise: a lane that runs only this adapter set or nothing, the least loaded
    first (lanes decode side by side, so spreading work uses every core, and two adapter sets on
    two lanes never take turns); and inside the lane, neighbouring slot ids for one adapter
    group: llama.cpp decodes a batch in one pass only over consecutive sequence ids, so a group
    scattered over 0, 2, 4, 6 costs four passes per step instead of one (measured: 35 ms vs 20
    ms per step of 4).
    """
    running = [s for s in slots if s.run is not None]
    lane_keys = {lane.idx: {s.run.req.adapters for s in running if s.lane is lane} for lane in lanes}
    lane_load = {lane.idx: sum(1 for s in running if s.lane is lane) for lane in lanes}

    def placement(slot: Slot) -> tuple[int, int, int, int]:
        keys = lane_keys[slot.lane.idx]
        lane_fits = 1 if keys <= {req.adapters} else 0
        lane_running = [j for j in running if j.lane is slot.lane]
        if any(abs(j.seq - slot.seq) == 1 and j.run.req.adapters == req.adapters for j in lane_running):
            near = (1, 0)
        else:  # start a new group far from the lane's other groups
            others = [abs(j.seq - slot.seq) for j in lane_running if j.run.req.adapters != req.adapters]
            near = (0, min(others, default=len(slot.lane.slots)))
        return lane_fits, -lane_load[slot.lane.idx], *near

    def score(slot: Slot) -> tuple:
        n = common_prefix(slot.kv_tokens, req.prompt) if slot.kv_key == req.adapters else 0
        if n >= PREFIX_WORTH_TOKENS:
            return (1, n, *placement(slot), -slot.last_used)
        return (0, *placement(slot), n, -slot.last_used)

    best = max(free, key=score)
    return best, common_prefix(best.kv_tokens, req.prompt) if best.kv_key == req.adapters else 0


def choose_scoring_slot(free: Sequence[Slot]) -> Slot:
    """The slot for a request that scores its whole prompt (prompt logprobs): every position's
    logits are needed, so no cached prefix helps; an empty slot first, else the least recently used."""
    return max(free, key=lambda s: (s.kv_key == () and not s.kv_tokens, -s.last_used))


def choose_donor(slot: Slot, slots: Sequence[Slot], req: Request, n_keep: int, n_ctx_seq: int) -> tuple[Slot, int] | None:
    """Another slot whose KV holds a longer prefix of `req.prompt` than `slot` keeps (`n_keep`)
    and is worth copying: returns it and the prefix length, or None.

    Only KV computed under the same adapter set is ever copied, the same lane first (its copy is
    cheaper). A slot whose own copy is still pending does not donate across lanes (its cells are
    read out now, so they must already be computed)."""
    limit = len(req.prompt) - 1  # the last prompt token is always decoded for logits
    donor, best = None, n_keep
    for other in slots:
        if other is slot or other.kv_key != req.adapters:
            continue
        if other.lane is not slot.lane and (other.copy_pending or not other.kv_tokens):
            continue
        n = min(common_prefix(other.kv_tokens, req.prompt), limit)
        if n > best or (n == best and donor is not None and n > n_keep and other.lane is slot.lane
                        and donor.lane is not slot.lane):
            donor, best = other, n
    if donor is None or best - n_keep < max(SHARE_WORTH_TOKENS, n_ctx_seq // SHARE_CTX_PER_TOKEN):
        return None
    if donor.lane is not slot.lane and best - n_keep < len(donor.kv_tokens) // CROSS_LANE_TOKENS_PER_TOKEN:
        return None
    return donor, best


def choose_group(lane: Lane, runnable: Sequence[Slot], turn_steps: int,
                 on_turn_end: Callable[[int], None] | None = None) -> AdapterSet:
    """The adapter group that runs on `lane` this step, and the lane's turn bookkeeping.

    The current group keeps the lane while it is alone or for `turn_steps` steps; then the group
    that has waited longest since it last ran takes it (`on_turn_end` hears the turn's length)."""
    groups = {s.run.req.adapters for s in runnable}
    cur = lane.ctx_key
    if cur in groups and (len(groups) == 1 or lane.group_steps < turn_steps):
        lane.group_steps += 1
        return cur
    others = [g for g in groups if g != cur] or [cur]
    chosen = min(others, key=lambda g: lane.group_last_ran.get(g, 0.0))
    if cur is not None and lane.group_steps and on_turn_end is not None:
        on_turn_end(lane.group_steps)
    lane.group_steps = 1
    return chosen


def decode_rounds(sizes: Sequence[int]) -> list[list[int]]:
    """Which planned lanes (by index into `sizes`, their batch tokens) decode together, round by
    round. Alike batches run side by side, the threads split between them; when one is much larger
    than another (a prompt chunk next to a few decode tokens), side by side would leave the small
    lane's core idle while the big one runs on half the threads, so they run one after another
    with all the threads, the small one first."""
    if len(sizes) == 1 or max(sizes) <= SIDE_BY_SIDE_RATIO * min(sizes) + SIDE_BY_SIDE_SLACK:
        return [list(range(len(sizes)))]
    return [[i] for i in sorted(range(len(sizes)), key=lambda i: sizes[i])]


def thread_shares(n_threads: int, n_lanes: int) -> list[int]:
    """Threads for each of `n_lanes` decoding side by side: an even split, at least one each."""
    share, extra = divmod(n_threads, n_lanes)
    return [max(1, share + (1 if i < extra else 0)) for i in range(n_lanes)]
