"""The chat API end to end: real server, real model, real adapters, the official OpenAI client."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import PIRATE, ServerProcess, chat_body

QUESTION = "Write one sentence about the sea."


def greedy(client, model: str, content: str = QUESTION, max_tokens: int = 24, **extra) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens, **extra
    )
    return r.choices[0].message.content


def test_non_streaming_shape_with_openai_client(server: ServerProcess) -> None:
    client = server.client()
    r = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0, seed=7,
        user="alice",
    )
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == "base"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_shape_with_openai_client(server: ServerProcess) -> None:
    client = server.client()
    stream = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]  # 12 tokens are not enough to count to five and stop
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the same greedy request without streaming gives the same text
    assert text == greedy(client, "base", "Count to five.", max_tokens=12)


def test_stream_ends_with_done_and_first_chunk_has_role(server: ServerProcess) -> None:
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True, max_tokens=6)) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert all("usage" not in json.loads(e) for e in events[:-1])  # include_usage not asked


def test_text_parts_and_max_completion_tokens(server: ServerProcess) -> None:
    body = chat_body(max_tokens=None)
    body.pop("max_tokens")
    body["max_completion_tokens"] = 5
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]}]
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 5
    with server.http() as http:
        same = http.post("/v1/chat/completions", json=chat_body("Say hello.", max_tokens=5)).json()
    assert r.json()["choices"][0]["message"]["content"] == same["choices"][0]["message"]["content"]


def test_stop_sequence_cuts_the_answer(server: ServerProcess) -> None:
    client = server.client()
    full = greedy(client, "base", "Count from 1 to 10, separated by commas.", max_tokens=40)
    assert "5" in full, full
    cut = greedy(client, "base", "Count from 1 to 10, separated by commas.", max_tokens=40, stop=["5"])
    assert "5" not in cut
    assert full.startswith(cut)


def test_seeded_sampling_is_reproducible(server: ServerProcess) -> None:
    client = server.client()
    kw = dict(model="base", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=20,
              temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_adapter_changes_greedy_output_and_pinned_versions(server: ServerProcess) -> None:
    client = server.client()
    base = greedy(client, "base")
    a = greedy(client, "style-a")
    b = greedy(client, "style-b")
    assert len({base, a, b}) == 3, (base, a, b)
    assert greedy(client, "style-a@1") == a
    # per-request adapters on the base model, as llama-server's `lora` field
    assert greedy(client, "base", extra_body={"adapters": [{"name": "style-b", "scale": 1.0}]}) == b
    # scale 0 is the base model
    assert greedy(client, "base", extra_body={"adapters": [{"name": "style-a", "scale": 0.0}]}) == base


def test_response_headers_name_route_path_and_versions(server: ServerProcess) -> None:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(model="styled"))
        assert r.headers["x-route"] == "styled"
        assert r.headers["x-route-path"] == "finetuned"
        assert r.headers["x-adapters"] == "style-a@1:1"
        r = http.post("/v1/chat/completions", json=chat_body(model="pirate"))
        assert r.headers["x-route-path"] == "prompt" and r.headers["x-adapters"] == ""


def test_concurrent_requests_never_see_each_others_adapters(server: ServerProcess) -> None:
    """8 concurrent greedy requests on three adapter sets give exactly their solo answers."""
    client = server.client()
    models = ["base", "style-a", "style-b"]
    solo = {m: greedy(client, m) for m in models}
    assert len(set(solo.values())) == 3

    async def run() -> list[tuple[str, str]]:
        aclient = server.async_client()

        async def one(m: str) -> tuple[str, str]:
            r = await aclient.chat.completions.create(
                model=m, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
            )
            return m, r.choices[0].message.content

        return await asyncio.gather(*[one(models[i % 3]) for i in range(8)])

    for model, text in asyncio.run(run()):
        assert text == solo[model], model


def test_prompt_route_applies_its_system_prompt(server: ServerProcess) -> None:
    client = server.client()
    via_route = greedy(client, "pirate", "Who are you?")
    system = PIRATE.replace("{{ ship }}", "Black Pearl")
    explicit = client.chat.completions.create(
        model="base", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Who are you?"}],
    ).choices[0].message.content
    assert via_route == explicit
    assert via_route != greedy(client, "base", "Who are you?")


def test_split_route_is_sticky_per_conversation_and_uses_both_paths(server: ServerProcess) -> None:
    paths = {}
    with server.http() as http:
        for i in range(16):
            headers = {"X-Conversation-Id": f"conv-{i}"}
            r = http.post("/v1/chat/completions", json=chat_body(model="ab", max_tokens=2), headers=headers)
            paths[i] = r.headers["x-route-path"]
            again = http.post("/v1/chat/completions", json=chat_body(model="ab", max_tokens=2), headers=headers)
            assert again.headers["x-route-path"] == paths[i]
    assert set(paths.values()) == {"prompt", "finetuned"}


def test_route_falls_back_to_prompt_path_when_adapter_missing(server: ServerProcess) -> None:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(model="fallback"))
    assert r.status_code == 200
    assert r.headers["x-route-path"] == "prompt"
    assert "missing-adapter" in r.headers["x-route-fallback"]
    assert server.metric("chat_route_fallbacks_total", route="fallback") >= 1


def test_models_lists_base_routes_and_adapters(server: ServerProcess) -> None:
    models = {m.id: m for m in server.client().models.list().data}
    base = "SmolLM2-135M-Instruct.Q4_1"
    assert base in models
    for route in ("pirate", "styled", "ab", "fallback"):
        assert route in models
    for adapter in ("style-a", "style-a@1", "style-b", "style-b@1"):
        assert models[adapter].model_extra["parent"] == base


@pytest.mark.parametrize("model", ["base", "style-a"])
def test_follow_up_turn_reuses_the_cached_prefix(server: ServerProcess, model: str) -> None:
    client = server.client()
    history = [{"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model=model, messages=history, temperature=0, max_tokens=8)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And another one?"}]
    second = client.chat.completions.create(model=model, messages=history, temperature=0, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1
