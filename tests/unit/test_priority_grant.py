"""Client priorities are the operator's to grant: by default only 0, so no client can jump the queue or
preempt another's running request (issue 14: `priority: -1000000` used to be accepted)."""

from __future__ import annotations

import pytest

from pdserve.engine.config import ServeConfig
from pdserve.router import protocol as P


def _parse(priority: int, granted: tuple[int, int] | None = None) -> P.ParsedRequest:
    args = () if granted is None else (granted,)
    return P.parse_request({"prompt": "hi", "priority": priority}, "completion", 16, *args)


@pytest.mark.parametrize("priority", [-1_000_000, -1, 1, 10**30])
def test_by_default_only_the_default_priority_is_granted(priority):
    with pytest.raises(P.APIError) as err:
        _parse(priority)
    assert err.value.status == 400 and err.value.param == "priority"
    assert "only the default priority, 0" in err.value.message and "min_client_priority" in err.value.message
    assert _parse(0).priority == 0


def test_an_operator_grants_a_range():
    assert [_parse(p, (-2, 1)).priority for p in (-2, -1, 0, 1)] == [-2, -1, 0, 1]
    for p in (-3, 2):
        with pytest.raises(P.APIError) as err:
            _parse(p, (-2, 1))
        assert err.value.param == "priority" and "[-2, 1]" in err.value.message


@pytest.mark.parametrize("lo, hi", [(1, 2), (-2, -1)])
def test_a_range_without_the_default_priority_is_refused(lo, hi):
    with pytest.raises(ValueError, match="min_client_priority <= 0 <= max_client_priority"):
        ServeConfig(min_client_priority=lo, max_client_priority=hi)
