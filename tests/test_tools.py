"""Tool calling's pure logic (server/tools.py): parsing tools and choices, calls out of text,
holding back a streamed call, and the conversation the template renders. No model needed."""

from __future__ import annotations

import json

import pytest

from server import tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_tools_and_choices_are_validated_with_the_field_named() -> None:
    ts = tools.parse_tools([WEATHER, TIME])
    assert [t.name for t in ts] == ["get_weather", "get_time"]
    assert ts[1].parameters == {"type": "object", "properties": {}}
    assert tools.parse_tool_choice(None, ts).mode == "auto"
    assert tools.parse_tool_choice(None, []).mode == "none"
    assert tools.parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, ts).name == "get_time"
    for raw, param in [([{"type": "x"}], "tools[0]"), ([WEATHER, WEATHER], "tools[1].function.name"),
                       ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name")]:
        with pytest.raises(tools.ToolError) as e:
            tools.parse_tools(raw)
        assert e.value.param == param
    with pytest.raises(tools.ToolError):
        tools.parse_tool_choice("required", [])
    with pytest.raises(tools.ToolError):
        tools.parse_tool_choice({"type": "function", "function": {"name": "nope"}}, ts)


def test_calls_are_parsed_from_tagged_blocks_or_a_bare_object() -> None:
    ts = tools.parse_tools([WEATHER, TIME])
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>{"name": "get_time", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'  # fmt: skip
    calls = tools.parse_calls(text, ts)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].arguments) == {"city": "Oslo"}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert tools.parse_calls('{"name": "get_time", "parameters": {"city": "Rome"}}', ts)[0].name == "get_time"
    for not_a_call in ["Paris is sunny.", '{"name": "unknown", "arguments": {}}', "<tool_call>{broken",
                       '{"answer": 42}', ""]:
        assert tools.parse_calls(not_a_call, ts) is None


def test_streamed_text_is_held_back_only_while_it_may_be_a_call() -> None:
    d = tools.CallDetector()
    assert d.feed("  <tool") == "" and d.state == "undecided"
    assert d.feed("_call>{") == "" and d.state == "call"
    d = tools.CallDetector()
    assert d.feed("<to") == ""
    assert d.feed("day it rains") == "<today it rains" and d.state == "content"
    assert d.feed(" hard") == " hard"


def test_history_with_calls_renders_in_the_default_format() -> None:
    ts = tools.parse_tools([WEATHER])
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]  # fmt: skip
    out = tools.render_messages(msgs, ts, native=False)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in out[0]["content"] and tools.OPEN in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": tools.call_text("get_weather", '{"city": "Paris"}')}
    assert out[3] == {"role": "tool", "content": "Sunny"}
    assert tools.parse_calls(out[2]["content"], ts)[0].name == "get_weather"  # it round-trips
    assert tools.render_messages(msgs, ts, native=True) == msgs


def test_a_forced_call_schema_pins_the_name_and_the_parameters() -> None:
    ts = tools.parse_tools([WEATHER, TIME])
    one = tools.call_schema(ts, tools.ToolChoice("function", "get_weather"))
    assert one["properties"]["name"] == {"const": "get_weather"}
    assert one["properties"]["arguments"] == WEATHER["function"]["parameters"]
    both = tools.call_schema(ts, tools.ToolChoice("required"))
    assert [v["properties"]["name"]["const"] for v in both["anyOf"]] == ["get_weather", "get_time"]
