"""The OpenAI-compatible wire format: request parsing and validation, response and
SSE chunk bodies, and vLLM-style error bodies. No HTTP server and no Ray here.

Validation happens in two layers: pydantic checks shapes and types (unknown fields
are ignored, as OpenAI and vLLM do), then `SamplingParams` checks ranges; both
surface as `APIError` (HTTP 4xx with `{"error": {"message", "type", "param", "code"}}`).
The same pydantic models publish the request bodies in the OpenAPI schema (`openapi_schemas`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.messages import TokenLogprob, WorkerError
from pdserve.engine.sampling import (
    INT64_MAX,
    INT64_MIN,
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    SamplingParams,
    StructuredOutput,
)
from pdserve.router import tools as T

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions' `logprobs`
MIN_LOGPROB = -9999.0  # a token the controls masked has logprob -inf, which JSON cannot carry (vLLM's floor)
MAX_TOOLS = 128  # tools per request (each is rendered into the prompt and may become a grammar branch)
MAX_TOOL_CALLS = 128  # assistant tool calls per history message
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class APIError(Exception):
    """An error the API answers with a status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, type: str = "BadRequestError", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, type="BadRequestError", param=param)


def unavailable(message: str, retry_after: float | None = 1) -> APIError:
    """A 503 with `Retry-After` (whole seconds, at least 1): overload, draining, no worker to run on."""
    return APIError(503, message, type="ServiceUnavailable",
                    headers={"Retry-After": str(max(1, math.ceil(retry_after or 1)))})


def from_worker(err: WorkerError) -> APIError:
    """The one place a worker's error becomes an HTTP answer."""
    if err.status == 503:
        return unavailable(err.message, err.retry_after)
    return APIError(err.status, err.message, type=err.type, param=err.param)




class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # torch generators take 64-bit seeds
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # the sampling controls' ranges are SamplingParams' (published here too, for clients and the OpenAPI schema)
    presence_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)  # vLLM's
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's
    # JSON keys are strings: {"123": -100}
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-MAX_ABS_LOGIT_BIAS,
                                                                          le=MAX_ABS_LOGIT_BIAS)]] | None = \
        Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    min_tokens: int | None = Field(None, ge=0)  # vLLM's; at most max_tokens
    n: int = Field(1, ge=1)  # at most serve.max_n
    # vLLM's structured outputs (each at most MAX_GRAMMAR_SPEC_CHARS as JSON text; see `_structured`)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = 0  # lower runs first (vLLM's convention)
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # the alternatives per token
    # the prompt before the completion (with logprobs: the prompt tokens' too); strict: 0 is not False
    echo: bool = Field(False, strict=True)


class ContentPart(_Base):
    type: str
    text: str = ""


class FunctionCall(_Base):
    name: str = Field(pattern=TOOL_NAME)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Base):
    id: str | None = Field(None, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOL_CALLS)  # an assistant's earlier calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool message: the call it answers
    name: str | None = Field(None, max_length=256)


class FunctionDef(_Base):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Base):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the alternatives per token; needs logprobs
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Base):
    """vLLM's `POST /tokenize`: a completion `prompt`, or chat `messages` through the chat template."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # chat only
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (as vLLM)


class DetokenizeRequest(_Base):
    """vLLM's `POST /detokenize`."""

    model: str | None = None
    tokens: list[int]


class ScaleRequest(BaseModel):
    """`POST /admin/scale`: the wanted pool sizes; a pool left out (or null) keeps its size."""

    model_config = ConfigDict(extra="forbid")
    prefill: int | None = Field(None, ge=0, le=64, strict=True)
    decode: int | None = Field(None, ge=0, le=64, strict=True)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


def openapi_schemas() -> dict[str, Any]:
    """JSON schemas of the request and error bodies, keyed by model name, for `components.schemas`."""
    _, top = models_json_schema([(m, "validation") for m in (CompletionRequest, ChatCompletionRequest,
                                                              TokenizeRequest, DetokenizeRequest,
                                                              ScaleRequest, ErrorResponse)],
                                ref_template="#/components/schemas/{model}")
    return top["$defs"]


def check_strings(body: Any) -> None:
    """Every string in a parsed JSON body must be encodable (JSON escapes allow lone UTF-16 surrogates,
    which the tokenizer and the UTF-8 responses cannot take)."""
    stack = [body]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode()
            except UnicodeEncodeError:
                raise bad_request("the request contains a string that is not valid Unicode "
                                  "(an unpaired surrogate escape)") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def validate(model_cls: type[BaseModel], body: Any) -> Any:
    """`model_cls.model_validate(body)`, or `APIError` (400) naming the first offending field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    check_strings(body)
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        # the first error; among a union's alternatives, the one that got deepest into the value
        located = [(_param(err["loc"], body, err["type"] == "missing"), err) for err in e.errors()]
        first = located[0][0] or ""
        param, err = max(located, key=lambda pe: len(pe[0] or "") if (pe[0] or "").startswith(first) else -1)
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param) from None


def _param(loc: tuple, body: Any, missing: bool) -> str | None:
    """The dotted path of an error's location in the request body, without pydantic's union tags
    (`prompt.str` -> `prompt`, `messages.0.content.list[ContentPart].0.text` -> `messages.0.content.0.text`)."""
    path, v = [], body
    for i, part in enumerate(loc):
        if isinstance(v, dict) and part in v or isinstance(v, list) and isinstance(part, int) and 0 <= part < len(v):
            path.append(str(part))
            v = v[part]
        elif missing and i == len(loc) - 1:  # a required field that is absent
            path.append(str(part))
    return ".".join(path) or None


# OpenAI request fields (and vLLM extras that change the output) this server does not implement: a request
# that sets one to anything but a value that changes nothing (listed) gets a 400 naming it, never a silent
# ignore. Fields outside both APIs are ignored (clients send extras). `None` (JSON null) always means absent.
_BOTH, _CHAT, _COMPLETION = ("chat", "completion"), ("chat",), ("completion",)
UNSUPPORTED: dict[str, tuple[tuple[str, ...], tuple[Any, ...]]] = {
    # field: (the endpoints that know it, the values accepted because they ask for nothing)
    "best_of": (_COMPLETION, (1,)),
    "suffix": (_COMPLETION, ("",)),
    "functions": (_CHAT, ([],)),
    "function_call": (_CHAT, ("none",)),
    "audio": (_CHAT, ()),
    "modalities": (_CHAT, (["text"],)),
    "prediction": (_CHAT, ()),
    "reasoning_effort": (_CHAT, ()),
    "verbosity": (_CHAT, ()),
    "web_search_options": (_CHAT, ()),
    "store": (_CHAT, (False,)),  # we keep no completions
    "service_tier": (_CHAT, ("auto", "default")),
    # vLLM's extras
    "guided_grammar": (_BOTH, ()),
    "guided_decoding_backend": (_BOTH, ()),
    "guided_whitespace_pattern": (_BOTH, ()),
    "structured_outputs": (_BOTH, ()),
    "use_beam_search": (_BOTH, (False,)),
    "length_penalty": (_BOTH, (1,)),
    "prompt_logprobs": (_BOTH, ()),
    "allowed_token_ids": (_BOTH, ()),
    "bad_words": (_BOTH, ([],)),
    "include_stop_str_in_output": (_BOTH, (False,)),
    "skip_special_tokens": (_BOTH, (True,)),
    "truncate_prompt_tokens": (_BOTH, ()),
    "chat_template": (_CHAT, ()),
    "chat_template_kwargs": (_CHAT, ({},)),
    "add_generation_prompt": (_CHAT, (True,)),
    "continue_final_message": (_CHAT, (False,)),
}


def refuse_unsupported(body: dict[str, Any], kind: str) -> None:
    """`APIError` (400) naming the first field of `UNSUPPORTED` the request sets to something this server
    would have to ignore."""
    for name, (kinds, harmless) in UNSUPPORTED.items():
        v = body.get(name)
        if v is None or kind not in kinds or any(type(v) is type(h) and v == h or _same_number(v, h)
                                                 for h in harmless):
            continue
        accepted = f" (accepted: {', '.join(json.dumps(h) for h in harmless)}, or leave it out)" if harmless else ""
        raise bad_request(f"{name} is not supported by this server{accepted}", name)


def _same_number(v: Any, h: Any) -> bool:
    number = (int, float)
    return isinstance(v, number) and isinstance(h, number) and not isinstance(v, bool) \
        and not isinstance(h, bool) and v == h


@dataclass
class ParsedRequest:
    kind: Literal["completion", "chat"]
    model: str | None
    prompt: str | list[int] | None  # completions
    messages: list[dict[str, Any]] | None  # chat
    params: SamplingParams
    stream: bool
    include_usage: bool
    priority: int
    # the field that set `params.max_tokens` ("max_tokens" or "max_completion_tokens"); None: the server's
    # default, which the router cuts to what the context window leaves beside the prompt
    max_tokens_param: str | None = None
    n: int = 1  # choices, each sampled independently (parallel sampling, `Router.generate_choices`)
    echo: bool = False  # completions: the prompt's text (and logprobs) before each choice's
    tools: list[dict[str, Any]] | None = None  # for the chat template (None with tool_choice "none")
    # "none": plain text; "auto": the text is parsed for tool calls; "forced": structured outputs force a
    # call (`tool_name` named, or None for "required"), and the output is parsed as one (`router.tools`)
    tool_mode: Literal["none", "auto", "forced"] = "none"
    tool_name: str | None = None


def parse_request(body: Any, kind: Literal["completion", "chat"], default_max_tokens: int,
                  priority_range: tuple[int, int] = (0, 0), max_n: int = 1) -> ParsedRequest:
    """Validate a JSON body; raises `APIError` (400) naming the offending field. `priority_range`: the
    priorities this server grants its clients (`serve.min_client_priority`, `max_client_priority`); `max_n`:
    the most choices a request may ask for (`serve.max_n`)."""
    req = validate(CompletionRequest if kind == "completion" else ChatCompletionRequest, body)
    refuse_unsupported(body, kind)
    if not 1 <= req.n <= max_n:
        raise bad_request(f"n must be in [1, {max_n}] on this server (serve.max_n), got {req.n}", "n")
    lo, hi = priority_range
    if not lo <= req.priority <= hi:
        granted = "only the default priority, 0" if lo == hi == 0 else f"priorities in [{lo}, {hi}]"
        raise bad_request(f"priority {req.priority} is not granted: this server accepts {granted} (its operator sets "
                          "serve.min_client_priority and serve.max_client_priority)", "priority")
    max_tokens, max_tokens_param = req.max_tokens, "max_tokens" if req.max_tokens is not None else None
    if kind == "chat" and req.max_completion_tokens is not None:
        max_tokens, max_tokens_param = req.max_completion_tokens, "max_completion_tokens"  # the newer name wins
    logprobs = _logprobs(req, kind)
    tools, tool_mode, tool_name, forced = _tools(req) if kind == "chat" else (None, "none", None, None)
    structured = _structured(req, kind, forced)
    try:
        params = SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            seed=req.seed, stop=[] if req.stop is None else req.stop, stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            min_p=req.min_p or 0.0, logit_bias=req.logit_bias or {}, min_tokens=req.min_tokens or 0, logprobs=logprobs,
            prompt_logprobs=logprobs if kind == "completion" and req.echo else None,
            structured=structured)
    except InvalidRequestError as e:
        raise bad_request(str(e), max_tokens_param if e.param == "max_tokens" else e.param) from None
    prompt = messages = None
    if kind == "completion":
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request("batched prompts are not supported; send one prompt per request", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
    else:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:
            if m["role"] != "assistant" and m.get("tool_calls"):
                raise bad_request("only assistant messages carry tool_calls", "messages")
            if isinstance(m.get("content"), list):  # text parts only
                if any(p["type"] != "text" for p in m["content"]):
                    raise bad_request("only text content parts are supported", "messages")
                m["content"] = "".join(p["text"] for p in m["content"])
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ParsedRequest(kind, req.model, prompt, messages, params, req.stream, include_usage, req.priority,
                         max_tokens_param, req.n, kind == "completion" and req.echo, tools, tool_mode,
                         tool_name)


def _tools(req: ChatCompletionRequest) -> tuple[list[dict] | None, str, str | None, StructuredOutput | None]:
    """(tools for the template, tool mode, the forced function's name, the grammar that forces the call)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names", "tools")
    if choice == "none":
        return None, "none", None, None
    if choice == "auto":
        return tools, "auto", None, None
    name = None
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools "
                              f"({', '.join(names)})", "tool_choice")
    parallel = req.parallel_tool_calls is not False
    forced = T.forced_schema(tools, name, parallel)
    return tools, "forced", name, _structured_output("json", forced, "tool_choice")


def _structured(req: Any, kind: str, forced: StructuredOutput | None) -> StructuredOutput | None:
    """The one structured-output constraint a request sets (response_format, guided_json, guided_regex,
    guided_choice, or a forced tool call); two are a 400."""
    asked: list[StructuredOutput] = [forced] if forced is not None else []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type == "json_object":
        asked.append(StructuredOutput("json_object", "", "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema", "response_format")
        asked.append(_structured_output("json", rf.json_schema.schema_, "response_format"))
    if req.guided_json is not None:
        asked.append(_structured_output("json", req.guided_json, "guided_json"))
    if req.guided_regex is not None:
        asked.append(_structured_output("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        if not req.guided_choice:
            raise bad_request("guided_choice must list at least one string", "guided_choice")
        asked.append(_structured_output("choice", req.guided_choice, "guided_choice"))
    if len(asked) > 1:
        raise bad_request(f"{asked[0].param} and {asked[1].param} both constrain the output; set one",
                          asked[1].param)
    return asked[0] if asked else None


def _structured_output(kind: str, spec: Any, param: str) -> StructuredOutput:
    # key order kept (the output follows the schema's order); the text is the cache key
    text = spec if isinstance(spec, str) else json.dumps(spec, separators=(",", ":"))
    try:
        return StructuredOutput(kind, text, param)
    except InvalidRequestError as e:
        raise bad_request(str(e), param) from None


def _logprobs(req: Any, kind: str) -> int | None:
    """`SamplingParams.logprobs` from chat's `logprobs`/`top_logprobs` or completions' `logprobs: k`."""
    if kind == "completion":
        return req.logprobs
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


@dataclass
class ParsedTokenize:
    """A validated `/tokenize` body: exactly one of `prompt` (str or ids) and `messages` (flattened to text)."""

    model: str | None
    prompt: str | list[int] | None
    messages: list[dict[str, Any]] | None
    add_generation_prompt: bool
    add_special_tokens: bool


def parse_tokenize(body: Any) -> ParsedTokenize:
    req = validate(TokenizeRequest, body)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt" if req.prompt is None else "messages")
    messages = None
    if req.messages is not None:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:
            if isinstance(m.get("content"), list):  # text parts only
                if any(p["type"] != "text" for p in m["content"]):
                    raise bad_request("only text content parts are supported", "messages")
                m["content"] = "".join(p["text"] for p in m["content"])
    special = req.add_special_tokens if req.add_special_tokens is not None else req.messages is None
    return ParsedTokenize(req.model, req.prompt, messages, req.add_generation_prompt, special)


# -- responses -------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list[TokenLogprob], token_text) -> dict[str, Any]:
    """OpenAI chat's `choices[].logprobs` for these tokens; `token_text(id)` is a token's text."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode())}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], token_text, offset: int) -> dict[str, Any]:
    """Legacy completions' `choices[].logprobs` for these tokens, the first at character `offset` of the text
    (offsets add up the tokens' texts). `top_logprobs` maps token text to logprob, the sampled token included
    (as vLLM does); tokens that decode alike (bytes of a split character) share one entry, the likeliest's."""
    tokens = [token_text(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    tops = []
    for e in entries:
        top: dict[str, float] = {}
        for t, lp in (*e.top, (e.token_id, e.logprob)):
            top.setdefault(token_text(t), max(lp, MIN_LOGPROB))  # tokens of the same text: the likeliest
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [max(e.logprob, MIN_LOGPROB) for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(prompt_ids: list[int], entries: list[TokenLogprob], token_text) -> dict[str, Any]:
    """Completions' `logprobs` of an echoed prompt: its first token has none (null, as in OpenAI and vLLM);
    `entries` are the others' (`SamplingParams.prompt_logprobs`)."""
    first = token_text(prompt_ids[0])
    rest = completion_logprobs(entries, token_text, len(first))
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def full_response(kind: str, rid: str, model: str, created: int, text: str | None, finish_reason: str | None,
                  prompt_tokens: int, completion_tokens: int, logprobs: dict[str, Any] | None = None,
                  tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(kind: str, rid: str, model: str, created: int, text: str, finish_reason: str | None,
                 first: bool = False, logprobs: dict[str, Any] | None = None,
                 tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A chunk; `tool_calls`: (index, call) deltas, each call whole."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


class TextChunks:
    """The SSE bytes of a stream's plain text chunks (neither its first nor its last, no logprobs), built
    from a template made once per stream: the text is the only part that changes. Byte for byte what
    `stream_chunk` + compact `json.dumps` give, at a fraction of the cost (no dict, no encoder walk):
    the router frames every token of every stream, so this is its hottest path."""

    def __init__(self, kind: str, rid: str, model: str, created: int, index: int = 0):
        head = stream_chunk(kind, rid, model, created, "\x00", None)
        head["choices"][0]["index"] = index
        framed = "data: " + json.dumps(head, separators=(",", ":")) + "\n\n"
        self._head, self._tail = (part.encode() for part in framed.split('"\\u0000"'))

    def __call__(self, text: str) -> bytes:
        return self._head + _json_str(text).encode() + self._tail


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps does to a str (ensure_ascii, the default)


def usage_chunk(kind: str, rid: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def now() -> int:
    return int(time.time())
