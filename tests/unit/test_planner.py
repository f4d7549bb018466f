"""The SLA planner's decision function (`router.planner`), driven tick by tick with plain `Signals`: a
prefill-heavy load grows the prefill pool and a decode-heavy one the decode pool, by the sizes the cost model's
arithmetic gives; the pools shrink back one worker at a time once the load has stayed low, never past min or
max nor the device budget; an observed SLO miss outranks the model; and a steady, noisy load does not flap.
The pool manager's sum of the router replicas' load reports (`LoadSum`) is what one planner sees of them all."""

from __future__ import annotations

import math
import random

import pytest

from pdserve.engine.config import AutoscaleConfig
from pdserve.router.planner import (
    CostModel,
    LoadReport,
    LoadSum,
    LoadWindow,
    Planner,
    Signals,
    fit_decode_costs,
    histogram_quantile,
)

COSTS = CostModel(step_overhead_s=0.010, prefill_token_s=0.001, decode_token_s=0.002)
CFG = AutoscaleConfig(enabled=True, min_prefill=1, max_prefill=6, min_decode=1, max_decode=6, ttft_slo_s=2.0,
                      tpot_slo_s=0.1, cooldown_s=30, scale_down_after_s=60)


def load(now: float, p: int, d: int, rate: float, prompt: int, output: int, **kw) -> Signals:
    return Signals(now=now, prefill=p, decode=d, request_rate=rate, prompt_tokens_per_s=rate * prompt,
                   output_tokens=output, **kw)


PREFILL_HEAVY = {"rate": 4.0, "prompt": 500, "output": 20}  # prefill 0.51 s each: 2.04 devices' work
DECODE_HEAVY = {"rate": 4.0, "prompt": 50, "output": 200}  # 4 x 199 decode tokens x 2 ms: 1.59 devices' work
LIGHT = {"rate": 0.2, "prompt": 50, "output": 20}


def run(planner: Planner, phases: list[tuple[dict, int]], p: int = 1, d: int = 1, dt: float = 5.0):
    """Tick every `dt` s through (load, ticks) phases, applying each decision; the sizes after every tick."""
    now, sizes, decisions = 0.0, [], []
    for spec, ticks in phases:
        for _ in range(ticks):
            dec = planner.decide(load(now, p, d, **spec))
            p, d = dec.prefill, dec.decode
            sizes.append((p, d))
            decisions.append(dec)
            now += dt
    return sizes, decisions


def test_prefill_heavy_grows_prefill_to_what_the_model_needs():
    (p, d), = run(Planner(CFG, COSTS), [(PREFILL_HEAVY, 1)])[0]
    # utilization 2.04 / n <= 0.75 first at n = 3 (TTFT there ~1.05 s); decode work 0.15 of one device
    assert (p, d) == (3, 1)


def test_decode_heavy_grows_decode_to_what_the_model_needs():
    sizes, decisions = run(Planner(CFG, COSTS), [(DECODE_HEAVY, 1)])
    assert sizes == [(1, 3)]  # 1.59 / 2 = 0.80 > 0.75; / 3 = 0.53 (TPOT 21 ms)
    assert decisions[0].changed == ("decode",) and decisions[0].reasons["decode"].startswith("grow 1 -> 3")


def test_load_step_grows_the_right_pool_then_shrinks_back_one_at_a_time():
    planner = Planner(CFG, COSTS)
    sizes, decisions = run(planner, [(PREFILL_HEAVY, 12), (DECODE_HEAVY, 40), (LIGHT, 80)])
    assert sizes[0] == (3, 1)
    decode_phase = sizes[12:52]
    assert decode_phase[0] == (3, 3)  # the decode pool grows at once; the prefill pool is not shrunk yet
    assert decode_phase[-1] == (1, 3)  # the prefill pool came down after its load stayed low
    assert sizes[-1] == (1, 1)
    for (p0, d0), (p1, d1) in zip(sizes, sizes[1:], strict=False):  # shrinking: one worker per step
        assert p1 >= p0 - 1 and d1 >= d0 - 1
    shrinks = [(i, r) for i, dec in enumerate(decisions) for r in dec.changed
               if dec.size(r) < (sizes[i - 1][0] if r == "prefill" else sizes[i - 1][1])]
    for (i, role), (j, other) in zip(shrinks, shrinks[1:], strict=False):
        if role == other:
            assert (j - i) * 5.0 >= CFG.cooldown_s  # no pool changes twice within the cooldown


def test_never_past_min_or_max_or_the_budget():
    cfg = AutoscaleConfig(min_prefill=2, max_prefill=3, min_decode=1, max_decode=2, max_devices=4, cooldown_s=0,
                          scale_down_after_s=0)
    planner = Planner(cfg, COSTS)
    flood = {"rate": 50.0, "prompt": 2000, "output": 500}
    sizes, decisions = run(planner, [(flood, 5), (LIGHT, 10), (flood, 5)], p=2, d=1)
    assert all(2 <= p <= 3 and 1 <= d <= 2 and p + d <= 4 for p, d in sizes)
    assert sizes[4] in ((3, 1), (2, 2)) and sizes[14] == (2, 1)
    assert "hold at max" in " ".join(decisions[4].reasons.values())
    assert "max_devices" in " ".join(decisions[0].reasons.values())
    # sizes outside the bounds (a config changed under a running server) are brought inside
    assert planner.decide(load(1e6, 5, 0, **LIGHT)).size("prefill") == 3


def test_a_full_budget_moves_devices_to_the_short_pool_at_once():
    cfg = AutoscaleConfig(max_prefill=5, max_decode=5, max_devices=6, cooldown_s=10, scale_down_after_s=600)
    planner = Planner(cfg, COSTS)
    sizes, decisions = run(planner, [(PREFILL_HEAVY, 3), (DECODE_HEAVY, 3)], p=5, d=1)
    # the prefill pool is not made to wait scale_down_after_s: it hands the decode pool what it needs
    assert sizes[2] == (5, 1) and sizes[3] == (3, 3)
    assert "gives its device to the decode pool" in decisions[3].reasons["prefill"]
    assert all(p + d <= 6 for p, d in sizes)


def test_steady_noisy_load_does_not_flap():
    planner = Planner(CFG, COSTS)
    rng = random.Random(0)
    p, d, changes = 1, 1, []
    for tick in range(400):  # ~33 minutes at 5 s a tick, rates +-15% around a level between sizes
        jitter = 1 + rng.uniform(-0.15, 0.15)
        s = load(tick * 5.0, p, d, rate=3.0 * jitter, prompt=500, output=120,
                 ttft_s=0.8 * jitter, tpot_s=0.02 * jitter)
        dec = planner.decide(s)
        changes += [(tick, r) for r in dec.changed]
        p, d = dec.prefill, dec.decode
    assert changes and all(t <= 1 for t, _ in changes), changes  # sized on the first tick, then held


def test_observed_miss_outranks_the_model():
    planner = Planner(CFG, COSTS)
    quiet = load(0.0, 2, 2, **LIGHT, tpot_s=0.25)
    dec = planner.decide(quiet)
    assert dec.decode == 3 and "observed TPOT" in dec.reasons["decode"]
    assert dec.prefill == 2  # the prefill pool is not to blame: no shrink while the model's low-load timer runs
    # a TTFT miss grows the prefill pool only when a prefill backlog explains it
    assert Planner(CFG, COSTS).decide(load(0.0, 1, 1, **LIGHT, ttft_s=5.0)).prefill == 1
    dec = Planner(CFG, COSTS).decide(load(0.0, 1, 1, **LIGHT, ttft_s=5.0, prefill_queue_tokens=3000))
    assert dec.prefill == 2 and "backlog" in dec.reasons["prefill"]


def test_cooldown_holds_a_second_growth():
    planner = Planner(CFG, COSTS)
    assert planner.decide(load(0.0, 1, 1, **DECODE_HEAVY)).decode == 3
    heavier = {**DECODE_HEAVY, "rate": 8.0}
    dec = planner.decide(load(10.0, 1, 3, **heavier))
    assert dec.decode == 3 and "cooldown" in dec.reasons["decode"]
    assert planner.decide(load(31.0, 1, 3, **heavier)).decode == 5  # 3.18 / 5 = 0.64


def test_colocated_sizes_the_decode_pool_for_both_phases():
    planner = Planner(AutoscaleConfig(min_prefill=0, max_prefill=0, max_decode=8), COSTS)
    dec = planner.decide(load(0.0, 0, 1, **PREFILL_HEAVY, colocated=True))
    # the decode workers carry the prefill work (2.04 devices) and the decode work (0.15) together
    assert dec.prefill == 0 and dec.changed == ("decode",)
    assert dec.decode == next(n for n in range(1, 9) if (2.04 + 0.152) / n <= 0.75)
    assert dec.reasons["prefill"].startswith("colocated")


def test_fit_decode_costs():
    assert fit_decode_costs([(1, 0.012), (4, 0.018), (8, 0.026)]) == pytest.approx((0.010, 0.002), abs=1e-4)
    assert fit_decode_costs([(4, 0.02), (4, 0.021)]) is None
    assert fit_decode_costs([(1, 0.02), (8, 0.019)]) == pytest.approx((0.0195714, 0.0), abs=1e-4)


def test_config_refuses_bad_bounds():
    with pytest.raises(ValueError):
        AutoscaleConfig(min_decode=0)
    with pytest.raises(ValueError):
        AutoscaleConfig(min_prefill=3, max_prefill=2)
    with pytest.raises(ValueError):
        AutoscaleConfig(max_devices=1)
    with pytest.raises(ValueError):
        AutoscaleConfig(scale_down_utilization=0.8, target_utilization=0.7)


def test_load_window_rates_and_expected_output():
    w = LoadWindow(horizon_s=100)
    for i in range(20):  # 2 req/s for 10 s, 100-token prompts asking for 50 tokens
        w.arrived(0.25 + i * 0.5, 100, 50)
    rate, prompt_rate, out = w.rates(10.0, window_s=5.0, since=0.0)
    assert rate == pytest.approx(2.0) and prompt_rate == pytest.approx(200.0) and out == 50
    w.done(9.0, 50, 20)  # finished requests generated 40% of what they asked for (EOS)
    assert w.rates(10.0, 5.0, 0.0)[2] == pytest.approx(20.0)
    young = LoadWindow()
    for t in (0.25, 0.75, 1.25, 1.75):
        young.arrived(t, 10, 10)
    assert young.rates(2.0, 5.0, since=0.0)[0] == pytest.approx(2.0)  # a young loop: over its 2 s, not 5
    w.arrived(500.0, 1, 1)
    assert len(w.arrivals) == 1  # older than the horizon: dropped


def test_load_window_reports_each_event_once():
    w = LoadWindow(horizon_s=10)
    w.arrived(1.0, 5, 6)
    cursor = w.counts
    assert w.since(0, 0) == (((1.0, 5, 6),), ())
    w.arrived(2.0, 7, 8)
    w.done(3.0, 6, 6)
    assert w.since(*cursor) == (((2.0, 7, 8),), ((3.0, 6, 6),))
    cursor = w.counts
    w.arrived(20.0, 1, 1)  # trims the first two off the horizon: the cursor still counts them
    assert w.since(*cursor) == (((20.0, 1, 1),), ())


def test_load_sum_adds_every_replicas_load_once():
    total = LoadSum()
    inf = math.inf
    # replica a: 2 requests of 100 prompt tokens, 2 TTFTs under 0.1 s; replica b: 1 of 400, 1 TTFT under 1 s
    total.add("a", LoadReport(((1.0, 100, 10), (0.5, 100, 10)), (), ((0.1, 2.0), (1.0, 2.0), (inf, 2.0)), (),
                              prefill_queue_tokens=30), now=100.0)
    total.add("b", LoadReport(((0.2, 400, 10),), ((0.1, 10, 10),), ((0.1, 0.0), (1.0, 1.0), (inf, 1.0)), (),
                              prefill_queue_tokens=12), now=100.0)
    load = total.load(100.0, window_s=4.0, since=0.0, live={"a", "b"})
    assert load.request_rate == pytest.approx(3 / 4) and load.prompt_tokens_per_s == pytest.approx(600 / 4)
    assert load.prefill_queue_tokens == 42 and load.replicas == 2
    assert load.ttft == ((0.1, 2.0), (1.0, 3.0), (inf, 3.0))
    # a's next report: its cumulative histogram grew by one (counted once, not again with the old two)
    total.add("a", LoadReport((), (), ((0.1, 3.0), (1.0, 3.0), (inf, 3.0)), (), prefill_queue_tokens=0), now=101.0)
    assert total.load(101.0, 4.0, 0.0, {"a", "b"}).ttft == ((0.1, 3.0), (1.0, 4.0), (inf, 4.0))
    # b restarted (its counts began again) and then left: the sum never goes back; its queue no longer counts
    total.add("b", LoadReport((), (), ((0.1, 1.0), (1.0, 1.0), (inf, 1.0)), (), prefill_queue_tokens=5,
                              incarnation="b2"), now=102.0)
    total.leave("b")
    load = total.load(102.0, 4.0, 0.0, {"a"})
    assert load.ttft == ((0.1, 4.0), (1.0, 5.0), (inf, 5.0)) and load.prefill_queue_tokens == 0
    assert load.request_rate == pytest.approx(3 / 4)  # its requests stay in the window


def test_histogram_quantile_matches_prometheus():
    buckets = [(0.1, 10.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.1 + 0.4 * 40 / 80)
    assert histogram_quantile(buckets, 0.9) == pytest.approx(0.5)
    assert histogram_quantile([(0.1, 0.0), (math.inf, 0.0)], 0.9) is None
    assert histogram_quantile([(0.1, 0.0), (math.inf, 4.0)], 0.9) == 0.1  # in +Inf: the largest finite bound


def test_serve_flags_fill_the_autoscale_section():
    import argparse

    from pdserve.serve import add_serve_args, serve_config

    p = argparse.ArgumentParser()
    add_serve_args(p)
    cfg = serve_config(p.parse_args(["--autoscale", "--max-prefill-workers", "3", "--max-decode-workers", "5",
                                     "--max-workers", "6", "--autoscale-ttft-s", "1.5", "--autoscale-tpot-s", "0.08"]))
    a = cfg.autoscale
    assert (a.enabled, a.max_prefill, a.max_decode, a.max_devices, a.ttft_slo_s, a.tpot_slo_s) == (
        True, 3, 5, 6, 1.5, 0.08)
    assert serve_config(p.parse_args([])).autoscale.enabled is False
    with pytest.raises(ValueError):
        serve_config(p.parse_args(["--autoscale", "--min-decode-workers", "3", "--max-decode-workers", "2"]))
