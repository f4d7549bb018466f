import math

import pytest

from pdserve.engine.sampling import InvalidSamplingParams, SamplingParams


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
])
def test_out_of_range_params_name_the_param(kw, param):
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(**kw)
    assert err.value.param == param


def test_single_stop_string_becomes_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy
