"""The engine in process, on the real model and real adapters: batching, isolation, reuse, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter_chat.chat_template import ChatTemplate
from adapter_chat.engine import Engine, EngineConfig, LoraHandle, SamplingParams, TokenEvent
from tests.conftest import make_lora_file

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three fruits.",
    "What is the capital of Italy?",
    "Describe a cat in a few words.",
]


@pytest.fixture(scope="module")
def loras(tmp_path_factory, base_info) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("loras")
    return (make_lora_file(d / "a.gguf", base_info, seed=101), make_lora_file(d / "b.gguf", base_info, seed=102))


def new_engine(model_path: Path, parallel: int, **kw) -> Engine:
    eng = Engine(EngineConfig(model_path, parallel=parallel, n_threads=2, **{"n_ctx": 512, **kw}))
    eng.start()
    return eng


@pytest.fixture(scope="module")
def template(base_info) -> ChatTemplate:
    return ChatTemplate.from_model(base_info)


@pytest.fixture
def engine8(model_path) -> Iterator[Engine]:
    eng = new_engine(model_path, 8)
    yield eng
    eng.close()


async def generate(eng: Engine, template: ChatTemplate, prompt: str, adapters=(), max_tokens: int = 40,
                   cancel_after: int | None = None) -> tuple[str, TokenEvent]:
    tokens = eng.tokenize(template.render_segments([{"role": "user", "content": prompt}]))
    stream = eng.submit(tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapters)
    text, n = "", 0
    async for event in stream:
        text += event.text
        n += 1
        if cancel_after is not None and n == cancel_after:
            stream.cancel()
        if event.final:
            return text, event
    raise AssertionError("stream ended without a final event")


def test_greedy_output_is_identical_alone_and_batched_on_mixed_adapters(engine8, template, loras) -> None:
    async def run() -> None:
        a = await engine8.load_adapter(loras[0])
        b = await engine8.load_adapter(loras[1])
        sets: list[tuple[tuple[LoraHandle, float], ...]] = [(), ((a, 1.0),), ((b, 1.0),), ((a, 0.5), (b, 0.5))]
        jobs = [(PROMPTS[i % 4], sets[i % 4]) for i in range(8)]
        alone = []
        for prompt, adapters in jobs:
            alone.append(await generate(engine8, template, prompt, adapters))
            engine8_clear(engine8)  # no prefix reuse: each solo run computes everything itself
        batched = await asyncio.gather(*[generate(engine8, template, p, ad) for p, ad in jobs])
        for (solo_text, solo_ev), (text, ev) in zip(alone, batched):
            assert text == solo_text
            assert ev.finish_reason == solo_ev.finish_reason
        # and again, now with every prefix served from the cache
        cached = await asyncio.gather(*[generate(engine8, template, p, ad) for p, ad in jobs])
        assert [t for t, _ in cached] == [t for t, _ in alone]
        assert all(ev.cached_tokens > 0 for _, ev in cached)
        assert len({t for t, _ in alone[:4]}) == 4  # the four adapter sets really differ

    asyncio.run(run())


def engine8_clear(eng: Engine) -> None:
    """Forget every slot's cached prefix (runs on the scheduler thread)."""
    def clear() -> None:
        for slot in eng.slots:
            eng._forget(slot)

    eng._call(clear).result(timeout=10)


def test_prefix_reuse_never_crosses_adapter_sets(model_path, template, loras) -> None:
    eng = new_engine(model_path, 1)  # one slot: the only KV there is, is the previous request's
    try:
        async def run() -> None:
            a = await eng.load_adapter(loras[0])
            b = await eng.load_adapter(loras[1])
            prompt = PROMPTS[0]
            b_fresh, ev = await generate(eng, template, prompt, ((b, 1.0),))
            assert ev.cached_tokens == 0
            await generate(eng, template, prompt, ((a, 1.0),))  # the slot now holds A's KV of the same prompt
            b_after_a, ev = await generate(eng, template, prompt, ((b, 1.0),))
            assert ev.cached_tokens == 0
            assert b_after_a == b_fresh
            again, ev = await generate(eng, template, prompt, ((b, 1.0),))
            assert ev.cached_tokens > 0 and again == b_fresh  # same set: reused, same text

        asyncio.run(run())
    finally:
        eng.close()


def test_cancelled_sequence_frees_its_slot(model_path, template) -> None:
    eng = new_engine(model_path, 1)
    try:
        async def run() -> None:
            long_job = asyncio.create_task(
                generate(eng, template, "Write a very long story.", max_tokens=400, cancel_after=3))
            waiting = asyncio.create_task(generate(eng, template, PROMPTS[2], max_tokens=8))
            text, ev = await long_job
            assert ev.finish_reason == "cancelled" and ev.completion_tokens < 400
            text2, ev2 = await waiting  # got the only slot after the cancel
            assert ev2.finish_reason in ("stop", "length") and text2
            assert eng.active == 0 and eng.queued == 0

        asyncio.run(run())
    finally:
        eng.close()


def test_generation_time_cap(model_path, template) -> None:
    eng = new_engine(model_path, 1, request_timeout_s=0.3)
    try:
        text, ev = asyncio.run(generate(eng, template, "Write a very long story.", max_tokens=2000))
        assert ev.finish_reason == "timeout" and ev.completion_tokens < 2000
    finally:
        eng.close()


def test_user_text_is_never_parsed_as_control_tokens(model_path, template) -> None:
    eng = new_engine(model_path, 1)
    try:
        typed = eng.tokenize(template.render_segments([{"role": "user", "content": "<|im_end|>"}]))
        im_end = eng._vocab.tokenize("<|im_end|>", add_special=False, parse_special=True)
        assert len(im_end) == 1
        # the template's own <|im_end|> tokens are there, the user's text became ordinary tokens
        user_part = eng.tokenize_text("<|im_end|>")
        assert im_end[0] not in user_part and len(user_part) > 1
        assert typed.count(im_end[0]) == 2  # system turn + user turn ends, nothing from the user
    finally:
        eng.close()


SHARED_SYSTEM = ("You are the support assistant of a small bakery. Answer in one short sentence, politely, "
                 "and never invent prices, opening hours or products that you were not told about.")


async def generate_chat(eng: Engine, template: ChatTemplate, system: str, user: str, adapters=(),
                        max_tokens: int = 24) -> tuple[str, TokenEvent]:
    tokens = eng.tokenize(template.render_segments([{"role": "system", "content": system},
                                                    {"role": "user", "content": user}]))
    stream = eng.submit(tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapters)
    text = ""
    async for event in stream:
        text += event.text
        if event.final:
            return text, event
    raise AssertionError("stream ended without a final event")


def test_a_shared_system_prompt_is_copied_between_slots_without_changing_answers(engine8, template, loras) -> None:
    """Eight conversations share a system prompt: it is computed once, copied into the other slots
    (reported as cached tokens), and every answer equals the one computed from scratch. A prefix
    computed under adapter A is never copied into a request on adapter B."""
    questions = [f"Question {i}: do you sell {food}?" for i, food in
                 enumerate(["rye bread", "croissants", "cakes", "coffee", "bagels", "pies", "muffins", "tea"])]

    async def run() -> None:
        a = await engine8.load_adapter(loras[0])
        b = await engine8.load_adapter(loras[1])
        fresh = []
        for q in questions:
            engine8_clear(engine8)
            fresh.append((await generate_chat(engine8, template, SHARED_SYSTEM, q))[0])
        engine8_clear(engine8)
        await generate_chat(engine8, template, SHARED_SYSTEM, "Hello!")  # one slot now holds the system prompt
        shared = await asyncio.gather(*[generate_chat(engine8, template, SHARED_SYSTEM, q) for q in questions])
        assert [t for t, _ in shared] == fresh
        assert all(ev.cached_tokens >= 32 for _, ev in shared), [ev.cached_tokens for _, ev in shared]

        # adapter sets: the slots now hold base KV of the system prompt; a request on B copies nothing
        engine8_clear(engine8)
        b_fresh, _ = await generate_chat(engine8, template, SHARED_SYSTEM, questions[0], ((b, 1.0),))
        engine8_clear(engine8)
        await generate_chat(engine8, template, SHARED_SYSTEM, "Hello!", ((a, 1.0),))
        await generate_chat(engine8, template, SHARED_SYSTEM, "Hello!")
        b_after, ev = await generate_chat(engine8, template, SHARED_SYSTEM, questions[0], ((b, 1.0),))
        assert ev.cached_tokens == 0
        assert b_after == b_fresh

    asyncio.run(run())


def test_two_adapter_sets_run_side_by_side_on_two_lanes(model_path, template, loras) -> None:
    """With two lanes, a request on adapter B does not wait for adapter A's turn to end: its first
    token comes while A's stream is still producing (A yields at most a few tokens in between). With
    one lane the same request waits for A's group turn (`turn_steps` tokens of A); that case is
    asserted too, so the test shows what the lanes change."""

    async def tokens_of_a_before_b(eng: Engine) -> int:
        a = await eng.load_adapter(loras[0])
        b = await eng.load_adapter(loras[1])
        a_tokens = 0
        b_started = asyncio.Event()
        seen_at_b: list[int] = []

        async def run_a() -> None:
            nonlocal a_tokens
            async for ev in eng.submit(eng.tokenize(template.render_segments(
                    [{"role": "user", "content": "Write a very long story."}])),
                    SamplingParams(max_tokens=120, temperature=0.0), ((a, 1.0),)):
                if ev.text:
                    a_tokens += 1
                    if a_tokens == 5:
                        b_started.set()

        async def run_b() -> None:
            await b_started.wait()
            before = a_tokens
            async for ev in eng.submit(eng.tokenize(template.render_segments(
                    [{"role": "user", "content": PROMPTS[1]}])),
                    SamplingParams(max_tokens=4, temperature=0.0), ((b, 1.0),)):
                if ev.text and not seen_at_b:
                    seen_at_b.append(a_tokens - before)

        await asyncio.gather(run_a(), run_b())
        return seen_at_b[0]

    two = Engine(EngineConfig(model_path, n_ctx=512, parallel=2, n_threads=2, lanes=2, turn_steps=48))
    two.start()
    try:
        assert len(two.lanes) == 2
        assert asyncio.run(tokens_of_a_before_b(two)) <= 3
    finally:
        two.close()
    one = Engine(EngineConfig(model_path, n_ctx=512, parallel=2, n_threads=2, lanes=1, turn_steps=48))
    one.start()
    try:
        assert asyncio.run(tokens_of_a_before_b(one)) >= 40
    finally:
        one.close()


async def answer_logprobs(eng: Engine, tokens: list[int], max_tokens: int = 24) -> tuple[list[float], TokenEvent]:
    """The greedy answer's per-token logprobs (exact floats) and the final event."""
    stream = eng.submit(tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0), ())
    out: list[float] = []
    async for event in stream:
        out += [lp.logprob for lp in event.logprobs or ()]
        if event.final:
            return out, event
    raise AssertionError("stream ended without a final event")


def test_a_prefix_computed_in_a_long_batch_gives_bit_identical_answers(model_path, template) -> None:
    """The same prompt position must get the same KV however many tokens it was decoded with.
    llama.cpp's CPU flash attention picks its kernel by the batch: a tiled F32 GEMM for 64+ query
    rows, an F16 dot-product loop below that. With it on, a system prompt computed inside an
    86-token prompt and then reused by a 37-token one changed the greedy answer (issue 11: the
    shared-server divergence after the tool loop). Compared here on logprobs, bit for bit."""
    eng = new_engine(model_path, 1)  # one slot: a request reuses exactly the previous one's KV
    try:
        async def run() -> None:
            short = eng.tokenize(template.render_segments([{"role": "user", "content": PROMPTS[0]}]))
            long = eng.tokenize(template.render_segments(
                [{"role": "user", "content": "Write a long story about a lighthouse keeper, " * 8}]))
            assert len(long) >= 64 + 30 and len(short) < 64
            fresh, ev = await answer_logprobs(eng, short)
            assert ev.cached_tokens == 0
            await answer_logprobs(eng, long, max_tokens=4)  # shares the system prompt with `short`
            engine8_clear(eng)
            await answer_logprobs(eng, long, max_tokens=4)  # the system prompt, computed in a 90+ token batch
            reused, ev = await answer_logprobs(eng, short)
            assert ev.cached_tokens >= 20  # the system prompt came from the long prompt's KV
            assert reused == fresh

        asyncio.run(run())
    finally:
        eng.close()


def test_long_context_decoding_does_not_depend_on_the_lanes_thread_count(model_path, template) -> None:
    """Past 512 KV cells llama.cpp's CPU flash attention splits a one-token decode across the
    threads and sums the parts, so the answer depended on how many threads the lane had (one when
    two lanes run side by side, two alone). A 600-token prompt, alone and next to another lane."""
    eng = new_engine(model_path, 2, n_ctx=1024, lanes=2)
    try:
        async def run() -> None:
            story = "The keeper climbed the stairs, lit the lamp and watched the sea. " * 40
            long = eng.tokenize(template.render_segments([{"role": "user", "content": story + "What did he do?"}]))
            other = eng.tokenize(template.render_segments([{"role": "user", "content": PROMPTS[1]}]))
            assert 512 < len(long) < 900
            alone, _ = await answer_logprobs(eng, long, max_tokens=16)
            engine8_clear(eng)
            (beside, _), _ = await asyncio.gather(answer_logprobs(eng, long, max_tokens=16),
                                                  answer_logprobs(eng, other, max_tokens=40))
            assert beside == alone

        asyncio.run(run())
    finally:
        eng.close()
