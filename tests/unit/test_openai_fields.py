"""The OpenAI request fields the server does not implement are refused with a 400 that names them (never
silently ignored); values that ask for nothing, and fields outside the OpenAI and vLLM APIs, pass."""

import pytest

from pdserve.router import protocol as P

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"prompt": "hi"}


def parse(kind: str, **fields) -> P.ParsedRequest:
    return P.parse_request({**(CHAT if kind == "chat" else COMPLETION), **fields}, kind, 16)


def refused(kind: str, **fields) -> P.APIError:
    with pytest.raises(P.APIError) as err:
        parse(kind, **fields)
    assert err.value.status == 400
    return err.value


@pytest.mark.parametrize("kind, field, value", [
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "function_call", "auto"),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "reasoning_effort", "high"),
    ("chat", "store", True),
    ("chat", "service_tier", "flex"),
    ("completion", "best_of", 2),
    ("completion", "suffix", "end"),
    ("completion", "guided_grammar", "root ::= 'a'"),
    ("chat", "chat_template", "{{ messages }}"),
    ("completion", "use_beam_search", True),
    ("completion", "prompt_logprobs", 1),
    ("chat", "skip_special_tokens", False),
    ("completion", "include_stop_str_in_output", True),
])
def test_an_unimplemented_field_is_a_400_naming_it(kind, field, value):
    err = refused(kind, **{field: value})
    assert err.param == field and field in err.message and err.body()["error"]["type"] == "BadRequestError"


@pytest.mark.parametrize("kind, fields", [
    ("chat", {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
              "modalities": ["text"], "service_tier": "auto", "logprobs": False}),
    ("completion", {"best_of": 1, "echo": False, "suffix": "", "logprobs": None}),
    ("chat", {"parallel_tool_calls": None, "audio": None}),  # null is absent
    # fields of neither API, and ones that describe the caller only, are ignored
    ("chat", {"user": "u1", "metadata": {"k": "v"}, "safety_identifier": "s", "prompt_cache_key": "p",
              "x_client_extra": {"a": 1}}),
])
def test_values_that_ask_for_nothing_and_unknown_fields_pass(kind, fields):
    parse(kind, **fields)


def test_a_true_or_a_string_is_not_taken_for_a_harmless_number():
    assert refused("completion", best_of=True).param == "best_of"
    assert refused("completion", echo=0).param == "echo"


def test_a_field_of_the_other_endpoint_is_ignored():
    parse("completion", tools=[{"type": "function"}])  # not a completions field: an extra like any other
    parse("chat", suffix="x")


def test_the_message_names_the_accepted_values():
    assert '"none"' in refused("chat", function_call="auto").message


def test_max_tokens_records_which_field_set_it():
    assert parse("chat").max_tokens_param is None
    assert parse("completion", max_tokens=5).max_tokens_param == "max_tokens"
    p = parse("chat", max_tokens=5, max_completion_tokens=7)
    assert p.max_tokens_param == "max_completion_tokens" and p.params.max_tokens == 7
    assert refused("chat", max_completion_tokens=0).param == "max_completion_tokens"


def test_the_sampling_controls_reach_the_params_bounded():
    p = parse("completion", presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, min_p=0.1,
              logit_bias={"17": -100, "3": 2.5}, min_tokens=4).params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == \
        (0.5, -1, 1.2, 0.1, 4)
    assert p.logit_bias == {17: -100.0, 3: 2.5}
    assert refused("chat", logit_bias={"x": 1}).param.startswith("logit_bias")
    assert refused("chat", logit_bias={str(i): 1 for i in range(301)}).param == "logit_bias"
    assert refused("chat", logit_bias={"5": 100.5}).param.startswith("logit_bias")
    assert "less than or equal to 2" in refused("chat", presence_penalty=3).message
    assert refused("completion", max_tokens=3, min_tokens=4).param == "min_tokens"


def test_logprobs_fields_are_bounded_per_endpoint():
    assert parse("chat").params.logprobs is None and parse("chat", logprobs=False).params.logprobs is None
    assert parse("chat", logprobs=True).params.logprobs == 0
    assert parse("chat", logprobs=True, top_logprobs=20).params.logprobs == 20
    assert parse("completion", logprobs=5).params.logprobs == 5
    assert refused("chat", top_logprobs=2).param == "top_logprobs"  # without logprobs: true
    assert "less than or equal to 20" in refused("chat", logprobs=True, top_logprobs=21).message
    assert "less than or equal to 5" in refused("completion", logprobs=6).message
    assert refused("completion", logprobs=-1).param == "logprobs"


def test_logprob_bodies_have_openais_shapes():
    from pdserve.engine.messages import TokenLogprob

    entries = [TokenLogprob(104, -0.5, ((104, -0.5), (105, -1.5))), TokenLogprob(105, float("-inf"), ())]
    chat = P.chat_logprobs(entries, chr)
    assert chat["content"][0] == {"token": "h", "logprob": -0.5, "bytes": [104], "top_logprobs": [
        {"token": "h", "logprob": -0.5, "bytes": [104]}, {"token": "i", "logprob": -1.5, "bytes": [105]}]}
    assert chat["content"][1]["logprob"] == P.MIN_LOGPROB  # -inf is no JSON
    comp = P.completion_logprobs(entries, chr, 7)
    assert comp == {"tokens": ["h", "i"], "token_logprobs": [-0.5, P.MIN_LOGPROB],
                    "top_logprobs": [{"h": -0.5, "i": -1.5}, {"i": P.MIN_LOGPROB}], "text_offset": [7, 8]}


def test_n_is_bounded_by_the_server_and_echo_asks_for_prompt_logprobs():
    assert P.parse_request({**COMPLETION, "n": 16}, "completion", 16, max_n=16).n == 16
    for n in (0, 17):
        with pytest.raises(P.APIError) as err:
            P.parse_request({**COMPLETION, "n": n}, "completion", 16, max_n=16)
        assert err.value.param == "n"
    assert refused("chat", n=2).param == "n"  # the default bound is 1
    p = parse("completion", echo=True, logprobs=2)
    assert p.echo and p.params.prompt_logprobs == 2 and p.params.logprobs == 2
    p = parse("completion", echo=True)
    assert p.echo and p.params.prompt_logprobs is None
    assert not parse("completion", logprobs=2).echo and parse("completion", logprobs=2).params.prompt_logprobs is None
    assert not parse("chat", echo=True).echo  # not a chat field
