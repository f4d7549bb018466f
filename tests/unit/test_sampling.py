import math

import pytest

from pdserve.engine.sampling import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    InvalidSamplingParams,
    SamplingParams,
)


@pytest.mark.parametrize("kw,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "stop"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
    ({"stop_token_ids": ["3"]}, "stop_token_ids"),
])
def test_out_of_range_params_name_the_param(kw, param):
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(**kw)
    assert err.value.param == param


def test_single_stop_string_becomes_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy


def test_the_limits_themselves_are_accepted():
    p = SamplingParams(stop=["y" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS,
                       stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    assert len(p.stop) == MAX_STOP_STRINGS and p.stop_token_set == frozenset(range(MAX_STOP_TOKEN_IDS))


def test_a_stop_list_storm_is_a_400_naming_the_limit():
    """50,000 stop strings (the attack in issue 14) are refused at the router, before any worker sees them."""
    from pdserve.router import protocol as P

    with pytest.raises(P.APIError) as err:
        P.parse_request({"prompt": "hi", "stop": [f"s{i}" for i in range(50_000)]}, "completion", 16)
    assert err.value.status == 400 and err.value.param == "stop"
    assert f"at most {MAX_STOP_STRINGS} strings" in err.value.message
