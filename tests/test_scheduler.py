"""The engine's scheduling policy on plain slots and lanes, without a model (adapter_chat/scheduler.py).

What a user would notice if these broke: a follow-up turn recomputing its whole conversation, two
adapters taking turns on one lane while another lane idles, one adapter starving another, a shared
system prompt computed once per slot, a stop string's first characters leaking to the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from adapter_chat import scheduler

A = ((1, 1.0),)  # an adapter set: handle 1 at scale 1
B = ((2, 1.0),)


@dataclass(eq=False)
class Lane:
    idx: int
    slots: list = field(default_factory=list)
    ctx_key: tuple | None = None
    group_steps: int = 0
    group_last_ran: dict = field(default_factory=dict)


@dataclass(eq=False)
class Slot:
    lane: Lane
    seq: int
    kv_tokens: list[int] = field(default_factory=list)
    kv_key: tuple = ()
    run: object = None
    last_used: float = 0.0
    copy_pending: bool = False


def engine(lanes: int = 2, per_lane: int = 4) -> tuple[list[Lane], list[Slot]]:
    ls = [Lane(i) for i in range(lanes)]
    slots = []
    for lane in ls:
        lane.slots = [Slot(lane, j) for j in range(per_lane)]
        slots += lane.slots
    return ls, slots


def req(prompt: list[int], adapters: tuple = ()) -> SimpleNamespace:
    return SimpleNamespace(prompt=prompt, adapters=adapters)


def running(slot: Slot, adapters: tuple) -> None:
    slot.run = SimpleNamespace(req=req([0], adapters))


def test_a_follow_up_turn_takes_the_slot_holding_its_conversation() -> None:
    lanes, slots = engine()
    history = list(range(100))
    slots[5].kv_tokens, slots[5].kv_key = history, A
    slot, n = scheduler.choose_slot(slots, slots, lanes, req(history + [7, 8, 9], A))
    assert slot is slots[5] and n == 100


def test_cached_kv_under_another_adapter_set_is_never_reused() -> None:
    lanes, slots = engine()
    slots[5].kv_tokens, slots[5].kv_key = list(range(100)), B
    _, n = scheduler.choose_slot(slots, slots, lanes, req(list(range(100)) + [1], A))
    assert n == 0


def test_a_second_adapter_goes_to_the_idle_lane_not_to_turns_on_a_busy_one() -> None:
    lanes, slots = engine()
    running(slots[0], A)
    free = [s for s in slots if s.run is None]
    slot, _ = scheduler.choose_slot(free, slots, lanes, req([1, 2, 3], B))
    assert slot.lane is lanes[1]


def test_one_adapter_group_takes_neighbouring_sequence_ids() -> None:
    lanes, slots = engine(lanes=1)
    running(slots[0], A)
    free = [s for s in slots if s.run is None]
    slot, _ = scheduler.choose_slot(free, slots, lanes, req([1, 2, 3], A))
    assert slot.seq == 1  # llama.cpp decodes consecutive ids in one pass


def test_a_shared_system_prompt_is_copied_from_a_donor_not_recomputed() -> None:
    lanes, slots = engine()
    system = list(range(200))
    slots[1].kv_tokens, slots[1].kv_key = system + [900, 901], A
    got = scheduler.choose_donor(slots[2], slots, req(system + [5, 6], A), n_keep=0, n_ctx_seq=2048)
    assert got == (slots[1], 200)
    # too short a prefix is not worth a copy; another adapter set's KV is never a donor
    assert scheduler.choose_donor(slots[2], slots, req(system[:10] + [5], A), 0, 2048) is None
    assert scheduler.choose_donor(slots[2], slots, req(system + [5], B), 0, 2048) is None


def test_across_lanes_a_donor_whose_own_copy_is_pending_does_not_donate() -> None:
    lanes, slots = engine()
    system = list(range(200))
    slots[0].kv_tokens, slots[0].kv_key, slots[0].copy_pending = system, A, True
    assert scheduler.choose_donor(slots[4], slots, req(system + [1], A), 0, 2048) is None  # other lane
    assert scheduler.choose_donor(slots[1], slots, req(system + [1], A), 0, 2048) == (slots[0], 200)  # same lane


def test_adapter_groups_take_turns_after_turn_steps() -> None:
    lanes, slots = engine(lanes=1)
    running(slots[0], A)
    running(slots[3], B)
    lane = lanes[0]
    lane.ctx_key, lane.group_last_ran = A, {A: 2.0, B: 1.0}
    ended: list[int] = []
    runnable = [slots[0], slots[3]]
    picks = []
    for _ in range(7):
        picks.append(scheduler.choose_group(lane, runnable, 3, ended.append))
        lane.ctx_key = picks[-1]  # the engine applies the chosen group's adapters
    assert picks == [A, A, A, B, B, B, A] and ended == [3, 3]
    # alone, a group keeps the lane however long it runs
    lane2 = Lane(1, ctx_key=A, group_steps=100)
    assert scheduler.choose_group(lane2, [slots[0]], 3) == A


def test_unlike_batches_decode_one_after_another_small_first() -> None:
    assert scheduler.decode_rounds([10, 12]) == [[0, 1]]
    assert scheduler.decode_rounds([512, 2]) == [[1], [0]]
    assert scheduler.thread_shares(2, 2) == [1, 1] and scheduler.thread_shares(2, 1) == [2]
    assert scheduler.thread_shares(1, 2) == [1, 1]


def test_a_later_choice_waits_for_the_first_choices_prompt() -> None:
    first = SimpleNamespace(after=None, fed=False, ended=False, stream=SimpleNamespace(cancelled=False))
    second = SimpleNamespace(after=first, fed=False, ended=False, stream=SimpleNamespace(cancelled=False))
    other = SimpleNamespace(after=None, fed=False, ended=False, stream=SimpleNamespace(cancelled=False))
    assert scheduler.admissible([second, other]) == 1
    first.fed = True
    assert scheduler.admissible([second, other]) == 0
