"""The planner in the simulator's loop (`bench.autoscale`, `simulate(controller=...)`): on a workload that
shifts from prefill-heavy to decode-heavy, on synthetic costs where arithmetic gives the right split of each
phase, the planner moves the devices to the pool that needs them, every request finishes exactly once while
instances come and go, and its goodput beats every fixed split."""

from __future__ import annotations

from pdserve.bench.autoscale import Phase, PlannerController, phased_workload, run
from pdserve.engine.config import AutoscaleConfig, SchedulerConfig
from pdserve.engine.simulator import CalibratedCost, Cluster, simulate
from pdserve.router.planner import CostModel, Planner

COST = CalibratedCost(0.010, 0.001, 0.002)
# prefill-heavy: 4 req/s x 0.51 s prefills = 2.04 devices -> 3P; decode-heavy: 4 x 199 x 2 ms = 1.59 -> 3D
PHASES = [Phase(40, 4.0, 500, 10), Phase(40, 4.0, 50, 200)]
CFG = AutoscaleConfig(enabled=True, min_prefill=1, max_prefill=3, min_decode=1, max_decode=3, max_devices=4,
                      ttft_slo_s=2.0, tpot_slo_s=0.04, interval_s=2, window_s=8, cooldown_s=4,
                      scale_down_after_s=8)
SCHED = SchedulerConfig(starvation_timeout=float("inf"), max_preemptions=None)
SLOS = {"ttft": 2.0, "tpot": 0.04}


def test_planner_follows_the_phases_and_loses_no_request():
    wl = phased_workload(PHASES, seed=1)
    ctl = PlannerController(Planner(CFG, CostModel(0.010, 0.001, 0.002)), {r.id: r.output_tokens for r in wl},
                            interval_s=2, startup_s=2, window_s=8)
    res = simulate(wl, SCHED, COST, num_blocks=1 << 16, cluster=Cluster(prefill=1, decode=1), slos=SLOS,
                   controller=ctl)
    sizes = {round(t): (p, d) for t, p, d, _ in ctl.history}
    assert sizes[30] == (3, 1) and sizes[76] == (1, 3), sizes
    assert all(p + d <= 4 for p, d in sizes.values())
    assert all(r.finish is not None and r.num_output_tokens == q.output_tokens
               for r, q in zip(res.requests, wl, strict=True))
    finishes = [e for e in res.events if e[2] == "finish"]
    assert sorted(e[1] for e in finishes) == sorted(r.id for r in wl)  # each exactly once
    names = {r.instance for r in res.requests} | {r.decode_instance for r in res.requests}
    assert len(names - {None}) > 4  # instances came and went


def test_planner_beats_every_fixed_split():
    out = run(PHASES, 4, COST, SLOS, CFG, SCHED, [1], interval=2, startup=2, window=8)
    table = {r["config"]: r for r in out["table"]}
    fixed = [r for name, r in table.items() if "P+" in name]
    assert len(fixed) == 3
    assert table["planner"]["goodput"] > max(r["goodput"] for r in fixed), table
