"""Structured outputs and tools, live (a real Ray cluster, real HTTP, the official client), disaggregated
and colocated: guided_choice, guided_regex, response_format json_schema and forced tool calls come back
matching their constraint, streamed and not (on the disaggregated path the prefill worker samples the first
token under the grammar and the decode worker continues from it); bad specs and an unknown tool are 400s
with the OpenAI error body; a client that leaves mid-stream frees every KV block. The slow test sends 50
schema-constrained requests to the default model in each mode and validates every answer."""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest

from tests.helpers import MODES, Server, serve_modes

SERVED = ("disagg-grpc", "colocated")
CHAT = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "size": {"enum": ["S", "M", "L"]}, "n": {"type": "integer",
                                                                                   "minimum": 0, "maximum": 99}},
          "required": ["name", "size", "n"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def servers(ray_cluster, tiny_text_model_dir):
    yield from serve_modes(ray_cluster, tiny_text_model_dir, SERVED)


def _chat(c, server, stream=False, max_tokens=60, **kw):
    """The whole answer's message (content, tool calls) and finish reason, streamed or not."""
    r = c.chat.completions.create(model=server.model, messages=CHAT, max_tokens=max_tokens, temperature=0,
                                  stream=stream, **kw)
    if not stream:
        m = r.choices[0].message
        calls = [(t.function.name, t.function.arguments) for t in m.tool_calls or ()]
        return m.content, calls, r.choices[0].finish_reason
    content, calls, reason = "", {}, None
    for ch in r:
        d = ch.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or ():
            calls.setdefault(t.index, [t.function.name, ""])[1] += t.function.arguments or ""
        reason = ch.choices[0].finish_reason or reason
    return content or None, [tuple(calls[i]) for i in sorted(calls)], reason


@pytest.mark.parametrize("stream", [False, True])
def test_constrained_outputs_match_in_both_modes(servers, stream):
    for name, server in servers.items():
        c = server.client()
        text, _, reason = _chat(c, server, stream, extra_body={"guided_choice": ["red", "green", "blue"]})
        assert text in ("red", "green", "blue") and reason == "stop", name
        text, _, _ = _chat(c, server, stream, extra_body={"guided_regex": r"[a-f]{4}-[0-9]{3}"})
        assert re.fullmatch(r"[a-f]{4}-[0-9]{3}", text), (name, text)
        text, _, reason = _chat(c, server, stream, response_format={
            "type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}})
        jsonschema.validate(json.loads(text), SCHEMA)
        assert reason == "stop", name
        r = c.completions.create(model=server.model, prompt="x", max_tokens=40, temperature=0,
                                 extra_body={"guided_json": SCHEMA})
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
        server.wait_kv_free()


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls(servers, stream):
    for name, server in servers.items():
        c = server.client()
        content, calls, reason = _chat(c, server, stream, tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert content is None and reason == "tool_calls" and len(calls) == 1, (name, content, calls)
        assert calls[0][0] == "get_weather"
        jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])
        content, calls, reason = _chat(c, server, stream, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False)
        assert reason == "tool_calls" and len(calls) == 1 and calls[0][0] in ("get_weather", "get_time"), calls
        tool = WEATHER if calls[0][0] == "get_weather" else TIME
        jsonschema.validate(json.loads(calls[0][1]), tool["function"]["parameters"])
        # tool_choice none: free text, no calls; a history with tool calls and a tool answer is accepted
        history = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
        r = c.chat.completions.create(model=server.model, messages=history, max_tokens=5, temperature=0,
                                      tools=[WEATHER, TIME], tool_choice="none")
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
        server.wait_kv_free()


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_calls_are_parsed_from_hermes_blocks(servers, stream):
    """tool_choice auto: `<tool_call>` blocks in the text become tool calls, the rest stays content. The tiny
    model writes one because a regex makes it (random weights would not)."""
    regex = r'ok <tool_call>\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}</tool_call>'
    for name, server in servers.items():
        content, calls, reason = _chat(server.client(), server, stream, max_tokens=120, tools=[WEATHER, TIME],
                                       extra_body={"guided_regex": regex})
        assert content.strip() == "ok" and reason == "tool_calls", (name, content, calls)
        assert len(calls) == 1 and calls[0][0] == "get_time" and json.loads(calls[0][1])["zone"] in ("UTC", "CET")
        server.wait_kv_free()


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strang"}}}},
     "response_format", "invalid JSON schema"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex", "does not compile"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice", "at least one"),
    ({"extra_body": {"guided_regex": "a" * 40_000}}, "guided_regex", "limit"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"extra_body": {"guided_grammar": "root ::= 'a'"}}, "guided_grammar", "not supported"),
]


@pytest.mark.parametrize("fields, param, message", BAD)
def test_bad_specs_and_unknown_tools_are_400s(servers, fields, param, message):
    server = servers["disagg-grpc"]
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(model=server.model, messages=CHAT, max_tokens=4, **fields)
    body = err.value.body
    assert body["param"] == param and message in body["message"] and body["type"] == "BadRequestError", body


def test_a_client_leaving_a_grammar_stream_frees_every_block(servers):
    for name, server in servers.items():
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30,
                          json={"prompt": "tell me", "max_tokens": 300, "temperature": 0, "stream": True,
                                "guided_regex": "[a-z]{300}"}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few tokens in, then the client goes away
            assert any(line.startswith("data: {") for line in got), name
        server.wait_kv_free()


N_REQUESTS = 50


@pytest.mark.slow
@pytest.mark.parametrize("mode", SERVED)
def test_fifty_schema_constrained_requests_on_the_default_model_all_validate(ray_cluster, default_model_dir, mode):
    server = Server(ray_cluster, None, model={"dtype": "auto"}, **json.loads(json.dumps(MODES[mode])))
    schemas = [SCHEMA, {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                                         "confidence": {"type": "integer", "minimum": 0,
                                                                        "maximum": 10}},
                        "required": ["answer", "confidence"], "additionalProperties": False}]
    answers: list = [None] * N_REQUESTS
    try:
        c = server.client()

        def ask(i: int) -> None:
            schema = schemas[i % 2]
            r = c.chat.completions.create(
                model=server.model, max_tokens=48, temperature=0.7, seed=i,
                messages=[{"role": "user", "content": f"Describe item {i} as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                        "strict": True}})
            answers[i] = (schema, r.choices[0].message.content, r.choices[0].finish_reason)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(N_REQUESTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        for i, a in enumerate(answers):
            assert a is not None, f"request {i} got no answer"
            schema, text, reason = a
            jsonschema.validate(json.loads(text), schema)
            assert reason == "stop", (i, text)
        server.wait_kv_free()
    finally:
        server.stop()
