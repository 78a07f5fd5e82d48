"""The OpenAI fields beyond plain chat, end to end through the official client and the real model:
structured outputs (JSON schema, JSON mode, GBNF), logit_bias, logprobs, GET /v1/models/{id}."""

from __future__ import annotations

import asyncio
import json
import math

import jsonschema
import numpy as np
import pydantic
import pytest

from tests.conftest import ROOT, ServerProcess, chat_body


S = {"type": "string", "maxLength": 24}  # bounded strings: a 135M model would otherwise ramble

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]},
    {"type": "object", "properties": {"price": {"type": "number"}}, "required": ["price"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
     "y": {"type": "integer"}}, "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"city": S, "country": S, "population": {"type": "integer"}},
     "required": ["city", "country", "population"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"level": {"type": "integer"}, "unit": {"enum": ["m", "km"]}},
     "required": ["level", "unit"]},
    {"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "object",
     "properties": {"id": {"type": "integer"}, "label": S}, "required": ["id", "label"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"title": S, "draft": {"type": "boolean"}}, "required": ["title", "draft"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"mood": {"type": "string", "enum": ["happy", "sad"]},
     "score": {"type": "number"}}, "required": ["mood", "score"]},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": S, "roles": {
     "type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "maxItems": 3}}, "required": ["name", "roles"]}},
     "required": ["user"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "state": {
     "type": "string", "minLength": 2, "maxLength": 2}}, "required": ["zip", "state"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {"type": "array",
     "items": {"type": "integer"}, "maxItems": 2}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"step": {"type": "integer"}, "note": S}, "required": ["step"]},
    {"type": "object", "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
     "name": S}, "required": ["kind", "name"]}}, "properties": {"pet": {"$ref": "#/$defs/pet"}}, "required": ["pet"]},
]


def _schema_format(i: int, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}


@pytest.mark.parametrize("model", ["base", "style-a"])
def test_every_json_schema_answer_parses_and_validates(server: ServerProcess, model: str) -> None:
    """22 schemas, on the base and on an adapter, all at once (batched with each other): every
    answer is JSON that validates against its schema."""
    client = server.async_client()

    async def ask(i: int, schema: dict):
        return await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Describe something as JSON."}],
            response_format=_schema_format(i, schema), temperature=0, max_tokens=160,
        )  # fmt: skip

    async def plain():
        return await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Describe something as JSON."}], temperature=0,
            max_tokens=40, logprobs=True, top_logprobs=2,
        )  # fmt: skip

    async def main():
        try:
            mixed = await asyncio.gather(plain(), *(ask(i, s) for i, s in enumerate(SCHEMAS)), plain())
            alone = await plain()
            return mixed, alone
        finally:
            await client.close()

    (first, *answers, last), alone = asyncio.run(main())
    # plain requests batched among the constrained ones are unchanged by them
    assert first.choices[0].message.content == last.choices[0].message.content == alone.choices[0].message.content
    for schema, r in zip(SCHEMAS, answers):
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_mode_and_a_gbnf_grammar_constrain_the_answer(server: ServerProcess) -> None:
    client = server.client()
    r = client.chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "Give me a JSON object about ships."}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0,
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert r.choices[0].message.content.lstrip().startswith("{")
    r = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Is the sea blue?"}], max_tokens=8, temperature=0,
        extra_body={"grammar": 'root ::= ("yes" | "no") "."'},
    )  # fmt: skip
    assert r.choices[0].message.content in ("yes.", "no.")
    assert r.choices[0].finish_reason == "stop"


def test_the_examples_house_style_grammar_guarantees_the_format_on_the_base(server: ServerProcess) -> None:
    """The third way to a format (issue 11): the fractional-CTO example's GBNF grammar on the bare
    base, prompted with the example's system prompt. Its lines are bounded, so within 600 tokens
    every answer ends in the house structure; the grammar cannot make the content good (compare.py
    reports the share with distinct reasons)."""
    import sys

    example = ROOT / "examples" / "fractional-cto"
    sys.path.insert(0, str(example))
    try:
        from style_check import is_house_style
    finally:
        sys.path.remove(str(example))
    grammar = (example / "house-style.gbnf").read_text(encoding="utf-8")
    from adapter_chat.chat_template import render_system_prompt

    system = render_system_prompt((example / "cto-house-style.j2").read_text(encoding="utf-8"), {})
    client = server.client()
    for question in ("Should we rewrite our PHP app in Go?", "Is it time to hire a CTO?"):
        r = client.chat.completions.create(
            model="base", messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=600, temperature=0, extra_body={"grammar": grammar},  # the grammar's bound: 570 characters
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert is_house_style(r.choices[0].message.content), r.choices[0].message.content


class Ship(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    guns: int
    flag: str = pydantic.Field(max_length=12)


def test_openai_parse_round_trips_a_pydantic_model(server: ServerProcess) -> None:
    client = server.client()
    r = client.chat.completions.parse(
        model="base", messages=[{"role": "user", "content": "Describe a pirate ship."}], response_format=Ship,
        temperature=0, max_tokens=120,
    )  # fmt: skip
    ship = r.choices[0].message.parsed
    assert isinstance(ship, Ship) and ship.name


def test_a_bad_grammar_or_schema_is_a_400_before_any_token(server: ServerProcess) -> None:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(grammar="root ::= undefined-rule"))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "grammar" and "grammar" in err["message"]
        r = http.post("/v1/chat/completions", json=chat_body(grammar='root ::= "unterminated'))
        assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}
        r = http.post("/v1/chat/completions", json=chat_body(response_format=bad))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format.json_schema.schema"
        # a keyword the converter would not enforce is refused, never silently dropped
        ranged = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "level": {"type": "integer", "minimum": 1, "maximum": 5}}}}}  # fmt: skip
        r = http.post("/v1/chat/completions", json=chat_body(response_format=ranged))
        assert r.status_code == 400 and "'minimum' at properties.level" in r.json()["error"]["message"], r.text
        r = http.post("/v1/chat/completions", json=chat_body(response_format={"type": "json_schema"}))
        assert r.status_code == 400 and "json_schema" in r.json()["error"]["message"]
        both = chat_body(grammar='root ::= "a"', response_format={"type": "json_object"})
        assert http.post("/v1/chat/completions", json=both).status_code == 400
        # and the server keeps serving
        assert http.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200


def test_logit_bias_steers_the_sampler_and_bad_ids_are_named(server: ServerProcess, model_path) -> None:
    client = server.client()
    msgs = [{"role": "user", "content": "Say hello."}]
    plain = client.chat.completions.create(model="base", messages=msgs, temperature=0, max_tokens=4, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    # +100 on one token makes it the only answer; -100 on the greedy first token removes it
    with server.http() as http:
        tok_id = 28  # any ordinary token id of the vocabulary
        r = http.post("/v1/chat/completions", json=chat_body("Say hello.", max_tokens=3, temperature=0,
                                                             logit_bias={str(tok_id): 100}, logprobs=True))
        assert r.status_code == 200, r.text
        toks = [e["token"] for e in r.json()["choices"][0]["logprobs"]["content"]]
        assert len(toks) == 3 and len(set(toks)) == 1
    banned = client.chat.completions.create(
        model="base", messages=msgs, temperature=0, max_tokens=4, logprobs=True,
        logit_bias={str(_token_id(model_path, first.token)): -100},
    )  # fmt: skip
    assert banned.choices[0].logprobs.content[0].token != first.token
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(logit_bias={"99999999": 5}))
        assert r.status_code == 400 and "99999999" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "logit_bias"
        r = http.post("/v1/chat/completions", json=chat_body(logit_bias={"12": 500}))
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias")


def _token_id(model_path, piece: str) -> int:
    from trainer.llama_opt import VocabOnly

    with VocabOnly(model_path) as v:
        ids = v.tokenize(piece, add_special=False, parse_special=False)
    assert len(ids) == 1, (piece, ids)
    return ids[0]


def test_logprobs_match_an_independent_computation_and_are_normalised(
    server: ServerProcess, model_path, base_info
) -> None:
    """A greedy answer's logprobs equal log-softmax of llama.cpp logits computed in process on the
    same tokens; the sampled token is the top alternative; streaming gives the same entries."""
    from adapter_chat.chat_template import ChatTemplate, tokenize_segments
    from trainer.llama_opt import InferenceSession

    client = server.client()
    msgs = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="base", messages=msgs, temperature=0, max_tokens=12, logprobs=True,
                                       top_logprobs=5)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 5
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0 + 1e-6
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    with InferenceSession(model_path, n_ctx=512, threads=1) as inf:
        template = ChatTemplate.from_model(base_info)
        prompt = tokenize_segments(inf.vocab, template.render_segments(msgs, add_generation_prompt=True))
        answer = inf.generate_ids(prompt, max_tokens=12)
        nll = inf.window_nll(prompt + answer)[len(prompt) - 1 :]
    assert len(answer) == len(content)
    np.testing.assert_allclose([e.logprob for e in content], -nll, atol=2e-2)
    stream = client.chat.completions.create(model="base", messages=msgs, temperature=0, max_tokens=12, logprobs=True,
                                            top_logprobs=5, stream=True)  # fmt: skip
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_logprobs_off_by_default_and_top_logprobs_needs_logprobs(server: ServerProcess) -> None:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=3))
        assert r.json()["choices"][0]["logprobs"] is None
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=3, top_logprobs=3))
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=3, logprobs=True, top_logprobs=21))
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_retrieve_one_model(server: ServerProcess) -> None:
    client = server.client()
    base = client.models.list().data[0].id
    assert client.models.retrieve(base).id == base
    assert client.models.retrieve("base").id == base  # the alias names the same model
    assert client.models.retrieve("style-a@1").owned_by == "adapter"
    assert client.models.retrieve("pirate").owned_by == "route"
    with server.http() as http:
        r = http.get("/v1/models/no-such-model")
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]


def test_n_choices_share_the_prompt_and_each_has_its_own_seed(server: ServerProcess) -> None:
    """n = 3: three choices, indexed; the prompt is counted once and copied from the first
    choice's KV, not recomputed; choice i samples as a lone request with seed + i would."""
    client = server.client()
    msgs = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper and a storm."}]
    copies = server.metric("engine_prefix_copies_total")
    r = client.chat.completions.create(model="base", messages=msgs, n=3, seed=5, temperature=1.0, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(model="base", messages=msgs, seed=5 + i, temperature=1.0, max_tokens=10)
             for i in range(3)]  # fmt: skip
    assert [c.message.content for c in r.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in r.choices}) > 1  # different seeds, different draws
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert server.metric("engine_prefix_copies_total") >= copies + 2
    stream = client.chat.completions.create(model="base", messages=msgs, n=3, seed=5, temperature=1.0, max_tokens=10,
                                            stream=True)  # fmt: skip
    texts = {0: "", 1: "", 2: ""}
    finishes = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [texts[i] for i in range(3)] == [c.message.content for c in r.choices]
    assert set(finishes) == {0, 1, 2}


def test_text_completions_with_the_openai_client(server: ServerProcess) -> None:
    client = server.client()
    r = client.completions.create(model="base", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    # a list of prompts, n choices each: choices are prompt-major, prompt tokens counted per prompt
    two = client.completions.create(model="base", prompt=["The sea is", "A ship is"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text  # greedy: both choices of a prompt agree
    alone = client.completions.create(model="base", prompt="A ship is", max_tokens=4, temperature=0)
    assert two.choices[2].text == alone.choices[0].text
    # streaming gives the same text, and an adapter route works too
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    with server.http() as http:
        body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 0}
        styled = http.post("/v1/completions", json={"model": "styled", **body})
        plain = http.post("/v1/completions", json={"model": "base", **body})
    assert styled.headers["x-adapters"] == "style-a@1:1" and styled.headers["x-route-path"] == "finetuned"
    # the route's adapter changes the model's distribution
    assert styled.json()["choices"][0]["logprobs"]["token_logprobs"] != plain.json()["choices"][0]["logprobs"]["token_logprobs"]
    # token-id prompts are accepted
    ids = client.completions.create(model="base", prompt=[1, 2, 3, 4], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 4


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_do(
    server: ServerProcess, model_path, base_info
) -> None:
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 1. The prompt's
    token logprobs equal an independent in-process computation on the same tokens."""
    from trainer.llama_opt import InferenceSession

    prompt = "Question: what colour is the sky? Answer: blue"
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 1, "temperature": 0,
                                               "logprobs": 1, "echo": True})  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith(prompt)
    lp = choice["logprobs"]
    with InferenceSession(model_path, n_ctx=512, threads=1) as inf:
        ids = inf.tokenize(prompt, add_special=inf.vocab.add_bos, parse_special=True)
        nll = inf.window_nll(ids)
    n = len(ids)
    assert len(lp["tokens"]) == n + 1 and lp["token_logprobs"][0] is None
    assert "".join(lp["tokens"][:n]) == prompt
    np.testing.assert_allclose(lp["token_logprobs"][1:n], -nll, atol=2e-2)
    for top, tok_lp in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= tok_lp - 1e-6
    assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]


def test_text_completion_refusals_name_the_field(server: ServerProcess) -> None:
    with server.http() as http:
        for body, param in [
            ({"model": "base", "prompt": "x", "suffix": "y"}, "suffix"),
            ({"model": "base", "prompt": "x", "best_of": 3}, "best_of"),
            ({"model": "base", "prompt": []}, "prompt"),
            ({"model": "base", "prompt": "x", "logprobs": 21}, "logprobs"),
            ({"model": "base", "prompt": [10**9]}, "prompt"),
            ({"model": "nope", "prompt": "x"}, "model"),
        ]:
            r = http.post("/v1/completions", json=body)
            assert 400 <= r.status_code < 500, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.json())


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
}}, {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
}}]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_the_official_clients_tool_loop(server: ServerProcess, stream: bool) -> None:
    """call (forced, grammar-constrained to the function's parameters) -> tool result -> answer."""
    client = server.client()
    msgs: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="base", tools=WEATHER, temperature=0, max_tokens=60)
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        if stream:
            calls: dict[int, dict] = {}
            finish = None
            for chunk in client.chat.completions.create(messages=msgs, tool_choice=choice, stream=True, **kw):
                for c in chunk.choices:
                    assert not c.delta.content  # a forced call streams no content
                    for tc in c.delta.tool_calls or []:
                        slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                        slot["id"] += tc.id or ""
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""
                    finish = c.finish_reason or finish
            assert finish == "tool_calls" and len(calls) == 1
            call = calls[0]
        else:
            r = client.chat.completions.create(messages=msgs, tool_choice=choice, **kw)
            assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
            tc = r.choices[0].message.tool_calls[0]
            call = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
        assert call["id"].startswith("call_") and call["name"] in ("get_weather", "get_time")
        if isinstance(choice, dict):
            assert call["name"] == "get_time"
        args = json.loads(call["arguments"])
        jsonschema.validate(args, WEATHER[0]["function"]["parameters"])
    msgs += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny and 21 degrees."},
    ]  # fmt: skip
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            messages=msgs, tool_choice="none", stream=True, **kw) if c.choices)  # fmt: skip
    else:
        final = client.chat.completions.create(messages=msgs, tool_choice="none", **kw)
        assert final.choices[0].finish_reason in ("stop", "length")
        text = final.choices[0].message.content
    assert text.strip()


def test_tool_errors_name_the_field(server: ServerProcess) -> None:
    with server.http() as http:
        for extra, param in [
            ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
            ({"tools": WEATHER, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
            ({"tool_choice": "required"}, "tool_choice"),
            ({"tools": WEATHER, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
            ({"functions": [{"name": "f"}]}, "functions"),
        ]:
            r = http.post("/v1/chat/completions", json=chat_body(**extra))
            assert r.status_code == 400, (extra, r.text)
            assert r.json()["error"]["param"] == param, (extra, r.json())
        r = http.post("/v1/chat/completions", json={"model": "base", "messages": [
            {"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_call_id"
