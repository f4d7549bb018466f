"""Structured outputs and tools in the request parser and the tool-call parser (torch-free): each
constraint field becomes one `StructuredOutput` (two are a 400), bad values are 400s naming the field,
`tool_choice` picks the mode (and forces the call's shape through a JSON schema), and Hermes-style
`<tool_call>` blocks come out of whole and streamed text alike, however the text is cut into pieces."""

import json

import pytest

from pdserve.router import protocol as P
from pdserve.router import tools as T
from tests.unit.test_openai_fields import parse, refused

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_each_constraint_field_becomes_one_structured_output():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    so = parse("chat", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                                "strict": True}}).params.structured
    assert (so.kind, json.loads(so.spec), so.param) == ("json", schema, "response_format")
    assert parse("chat", response_format={"type": "json_object"}).params.structured.kind == "json_object"
    assert parse("chat", response_format={"type": "text"}).params.structured is None
    assert parse("completion", guided_json=schema).params.structured.param == "guided_json"
    assert parse("completion", guided_regex="a+").params.structured.spec == "a+"
    so = parse("chat", guided_choice=["yes", "no"]).params.structured
    assert (so.kind, json.loads(so.spec)) == ("choice", ["yes", "no"])


def test_bad_constraints_are_400s_naming_the_field():
    assert refused("chat", guided_choice=[]).param == "guided_choice"
    assert refused("chat", guided_regex="a", guided_choice=["a"]).param == "guided_choice"  # two constraints
    assert refused("chat", response_format={"type": "json_schema"}).param == "response_format"
    assert refused("chat", response_format={"type": "xml"}).param.startswith("response_format")
    assert refused("completion", guided_regex="a" * 40_000).param == "guided_regex"  # bounded
    assert "limit" in refused("completion", guided_regex="a" * 40_000).message
    assert refused("chat", guided_regex="a+", min_tokens=2).param == "min_tokens"


def test_tool_choice_modes():
    p = parse("chat", tools=[WEATHER])
    assert p.tool_mode == "auto" and p.tools[0]["function"]["name"] == "get_weather" and p.params.structured is None
    p = parse("chat", tools=[WEATHER], tool_choice="none")
    assert p.tool_mode == "none" and p.tools is None
    p = parse("chat", tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert (p.tool_mode, p.tool_name, p.params.structured.param) == ("forced", "get_weather", "tool_choice")
    assert json.loads(p.params.structured.spec) == WEATHER["function"]["parameters"]
    p = parse("chat", tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(p.params.structured.spec)
    assert p.tool_name is None and schema["type"] == "array" and schema["maxItems"] == 1
    assert [b["properties"]["name"]["const"] for b in schema["items"]["anyOf"]] == ["get_weather", "get_time"]


def test_tool_errors_are_400s():
    err = refused("chat", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.param == "tool_choice" and "nope" in err.message
    assert refused("chat", tool_choice="required").param == "tool_choice"  # no tools
    assert refused("chat", tools=[WEATHER, WEATHER]).param == "tools"
    assert refused("chat", tools=[{"type": "function", "function": {"name": "bad name!"}}]).param.startswith("tools")
    assert refused("chat", tools=[TIME] * (P.MAX_TOOLS + 1)).param == "tools"
    assert refused("chat", tools=[WEATHER], tool_choice="required", guided_regex="a").param == "guided_regex"


def test_history_with_tool_calls_and_tool_messages_is_accepted():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    p = P.parse_request({"messages": msgs, "tools": [WEATHER]}, "chat", 16)
    rendered, tools = T.render_messages(p.messages, p.tools, native=False)
    assert tools is None and rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in \
        rendered[2]["content"]
    assert rendered[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    native, tools = T.render_messages(p.messages, p.tools, native=True)
    assert tools == p.tools and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    with pytest.raises(P.APIError):
        P.parse_request({"messages": [{"role": "user", "content": "x", "tool_calls": msgs[1]["tool_calls"]}]},
                        "chat", 16)


TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')


def test_hermes_tool_calls_are_parsed_whole_and_streamed():
    content, calls = T.parse_tool_calls(TEXT)
    assert content.strip() == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    for size in (1, 2, 3, 7, 11):  # every way of cutting the text gives the same content and calls
        stream = T.ToolCallStream()
        streamed, got = "", []
        for i in range(0, len(TEXT), size):
            text, new = stream.feed(TEXT[i:i + size])
            streamed += text
            got += new
        text, new = stream.finish()
        assert streamed + text == content and [c["function"] for c in got + new] == [c["function"] for c in calls]


def test_text_that_is_no_call_stays_content():
    assert T.parse_tool_calls("a < b and <tool") == ("a < b and <tool", [])
    content, calls = T.parse_tool_calls("<tool_call>not json</tool_call>")
    assert calls == [] and content == "<tool_call>not json</tool_call>"
    content, calls = T.parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}')  # EOS before the tag
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"x": 1}


def test_forced_output_is_parsed_as_calls():
    calls = T.parse_forced('{"city": "Rome"}', "get_weather")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    calls = T.parse_forced('[{"name": "get_time", "arguments": {}}]', None)
    assert calls[0]["function"]["name"] == "get_time"
    assert T.parse_forced('{"city": "Ro', "get_weather") == []  # cut short by max_tokens
