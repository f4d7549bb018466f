"""Structured outputs in the engine (`engine.structured`): the grammar's bitmask is applied batched on a
step's logits, beside rows without a grammar; the output matches the grammar (choice, regex, JSON); the
grammar state is rebuilt from the tokens a request already has (the decode side of a hand-over, a
migration); a bad spec is a typed error; every block is freed."""

from __future__ import annotations

import json
import re

import pytest

from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.sampling import SamplingParams, StructuredOutput
from pdserve.engine.structured import InvalidGrammarError


def _params(so: StructuredOutput, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 40, "temperature": 0, **kw}, structured=so)


def test_choice_regex_json_beside_free_rows(make_engine, tiny_text_model_dir):
    engine = make_engine(tiny_text_model_dir)
    choice = StructuredOutput("choice", json.dumps(["yes", "no", "maybe so"]), "guided_choice")
    regex = StructuredOutput("regex", r"[a-c]{3}-\d{2}", "guided_regex")
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4},
                                               "b": {"enum": [1, 2, 3]}}, "required": ["a", "b"],
              "additionalProperties": False}
    js = StructuredOutput("json", json.dumps(schema))
    outs = engine.generate(["hello", "abc", "xyz", "free"],
                           [_params(choice, temperature=1.0, seed=3), _params(regex), _params(js, max_tokens=60),
                            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)])
    assert outs[0].output_text in ("yes", "no", "maybe so") and outs[0].finish_reason.value == "stop"
    assert re.fullmatch(r"[a-c]{3}-\d{2}", outs[1].output_text), outs[1].output_text
    obj = json.loads(outs[2].output_text)
    assert set(obj) == {"a", "b"} and len(obj["a"]) <= 4 and obj["b"] in (1, 2, 3)
    assert outs[3].num_output_tokens == 8  # the free row is not constrained (nor ended by the others)


def test_state_replays_the_tokens_a_request_already_has(make_engine, tiny_text_model_dir):
    """A resumed request (migration; the decode side of a hand-over) continues under the grammar from the
    tokens it brings: the same text as an uninterrupted run."""
    engine = make_engine(tiny_text_model_dir)
    so = StructuredOutput("regex", r"[a-z]{6}", "guided_regex")
    whole = engine.generate(["resume me"], _params(so))[0]
    assert re.fullmatch(r"[a-z]{6}", whole.output_text)
    head = whole.output_token_ids[:2]
    engine.add_request("resumed", "resume me", _params(so), output_token_ids=head)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out if out.finished else final
    assert final.output_token_ids == whole.output_token_ids
    with pytest.raises(InvalidRequestError, match="does not match"):  # tokens the grammar refuses
        engine.add_request("bad", "resume me", _params(so), output_token_ids=[ord("0")])


@pytest.mark.parametrize("so, match", [
    (StructuredOutput("json", "{not json"), "not valid JSON"),
    (StructuredOutput("json", json.dumps({"type": "strang"})), "invalid JSON schema"),
    (StructuredOutput("regex", "(unclosed", "guided_regex"), "guided_regex does not compile"),
    (StructuredOutput("choice", "[]", "guided_choice"), "at least one"),
    (StructuredOutput("choice", '["a", 1]', "guided_choice"), "list of strings"),
    # compile time grows with repetition counts: they are bounded
    (StructuredOutput("regex", "[a-z]{5000}", "guided_regex"), "limit of 2048"),
    (StructuredOutput("json", json.dumps({"type": "object", "properties": {"s": {"type": "string",
                                                                               "maxLength": 100_000}}})),
     "maxLength 100000 is over"),
])
def test_bad_specs_are_typed_errors(make_engine, tiny_text_model_dir, so, match):
    engine = make_engine(tiny_text_model_dir)
    with pytest.raises(InvalidGrammarError, match=match) as e:
        engine.add_request("r", "x", _params(so))
    assert e.value.param == so.param
    assert not engine.seqs


def test_spec_size_is_bounded():
    with pytest.raises(InvalidRequestError, match="limit"):
        StructuredOutput("regex", "a" * 40_000, "guided_regex")
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured=StructuredOutput("json_object"))


def test_compiled_grammars_are_cached(make_engine, tiny_text_model_dir):
    engine = make_engine(tiny_text_model_dir)
    so = StructuredOutput("regex", "[0-9]+", "guided_regex")
    assert engine.grammars.compile(so) is engine.grammars.compile(StructuredOutput("regex", "[0-9]+", "x"))


def test_sampled_json_is_valid_json(make_engine, tiny_text_model_dir):
    """Random bytes under the schema, sampled: every output parses (strict JSON: no raw control characters
    in length-bounded strings, which xgrammar alone would let through) and validates."""
    import jsonschema

    engine = make_engine(tiny_text_model_dir)
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 5},
                                               "t": {"type": "string", "maxLength": 3}},
              "required": ["s", "t"], "additionalProperties": False}
    so = StructuredOutput("json", json.dumps(schema))
    outs = engine.generate([f"p{i}" for i in range(16)],
                           [_params(so, temperature=1.0, seed=i, max_tokens=80) for i in range(16)])
    for out in outs:
        jsonschema.validate(json.loads(out.output_text), schema)


def test_a_grammar_that_allows_nothing_more_ends_the_request(make_engine, tiny_text_model_dir):
    """An empty regex is complete before the first token; on a model without EOS nothing may follow, so the
    request ends at its first step instead of sampling from a row of -inf."""
    engine = make_engine(tiny_text_model_dir)
    for temperature in (0.0, 1.0):
        out = engine.generate(["x"], _params(StructuredOutput("regex", "", "guided_regex"), temperature=temperature))[0]
        assert out.finish_reason.value == "stop" and out.num_output_tokens == 1
