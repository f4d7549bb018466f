"""Tool calling on the router: tools into the chat template, tool calls out of the model's text.

The format is Hermes-style, which Qwen2.5 and Hermes models are trained on and which we describe to models
whose chat template knows no tools (SmolLM2's): the model writes each call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and a tool's answer comes back in a user turn
as `<tool_response>...</tool_response>`. Templates that take `tools=` themselves get them that way.

`tool_choice`:
- "none": no tools in the prompt, the text is not parsed;
- "auto" (the default with tools): the text is parsed for tool calls (`parse_tool_calls`, or
  `ToolCallStream` piece by piece while streaming);
- "required" and a named function: structured outputs force the call's shape (`forced_schema`): for a
  named function the output is its arguments object, for "required" a JSON array of
  `{"name", "arguments"}`; `parse_forced` turns the text into tool calls.

No torch, no Ray: pure functions over dicts and strings.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_SYSTEM = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
           "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
           "For each function call, return a json object with function name and arguments within "
           "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
           "<args-json-object>}}\n</tool_call>")


def template_knows_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders `tools` (and tool-call history) itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "tools" in template and "tool_call" in template


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    native: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for `apply_chat_template`. `native`: the template renders tools itself (assistant
    tool calls get their arguments as objects, as HF templates expect); otherwise the tools become a system
    prompt and the history is spelt out in the Hermes format as plain text."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _maybe_json(
                    c["function"]["arguments"])}} for c in m["tool_calls"]]
            out.append(m)
        return out, tools or None
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _maybe_json(c['function']['arguments'])})}\n{CLOSE}"  # noqa: E501
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        system = _SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, None


def _maybe_json(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def new_call(name: str, arguments: Any) -> dict[str, Any]:
    """An OpenAI tool call (`arguments` as a JSON string)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def _call_from_json(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return new_call(obj["name"], args if args is not None else {})


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a whole output: the text outside `<tool_call>` blocks (None when only
    whitespace) and each block's call; a block that does not parse stays in the content."""
    stream = ToolCallStream()
    content, calls = stream.feed(text)
    more, last = stream.finish()
    content += more
    calls += last
    return (content if content.strip() else None) if calls else content, calls


class ToolCallStream:
    """Splits streamed text into content and tool calls. Text that may be the start of `<tool_call>` is
    held back until it is or is not; a call is emitted whole once its closing tag arrives."""

    def __init__(self):
        self._pending = ""  # held back: a possible opening tag
        self._call: str | None = None  # inside a tool call: its text so far
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        content, calls = [], []
        buf = self._pending + text
        self._pending = ""
        while buf:
            if self._call is not None:
                self._call += buf
                buf = ""
                end = self._call.find(CLOSE)
                if end < 0:
                    break
                body, buf = self._call[:end], self._call[end + len(CLOSE):]
                self._call = None
                call = _call_from_json(body.strip())
                if call is None:
                    content.append(f"{OPEN}{body}{CLOSE}")
                else:
                    calls.append(call)
                continue
            start = buf.find(OPEN)
            if start >= 0:
                content.append(buf[:start])
                self._call = ""
                buf = buf[start + len(OPEN):]
                continue
            keep = _partial_suffix(buf, OPEN)
            content.append(buf[:len(buf) - keep])
            self._pending = buf[len(buf) - keep:]
            break
        self.num_calls += len(calls)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end of the output: an unclosed call that parses is a call (the model stopped at EOS
        before its closing tag); anything else held back is content."""
        rest, self._pending = self._pending, ""
        if self._call is None:
            return rest, []
        body, self._call = self._call, None
        call = _call_from_json(body.strip())
        if call is None:
            return f"{OPEN}{body}{rest}", []
        self.num_calls += 1
        return rest, [call]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def forced_schema(tools: list[dict[str, Any]], name: str | None, parallel: bool) -> dict[str, Any]:
    """The JSON schema the output must match when `tool_choice` forces a call: the named function's
    arguments, or (`required`) an array of calls to any of the tools (one call unless `parallel`)."""
    def params(t: dict[str, Any]) -> dict[str, Any]:
        return t["function"].get("parameters") or {"type": "object"}

    if name is not None:
        return params(next(t for t in tools if t["function"]["name"] == name))
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                        "arguments": params(t)},
                      "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    schema: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_forced(text: str, name: str | None) -> list[dict[str, Any]]:
    """The tool calls of an output that `forced_schema` constrained ([] when it is cut short)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    if name is not None:
        return [new_call(name, obj)]
    if not isinstance(obj, list):
        return []
    return [new_call(c["name"], c.get("arguments", {})) for c in obj if isinstance(c, dict) and "name" in c]
