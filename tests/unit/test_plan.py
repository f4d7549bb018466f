"""`pdserve plan` finds the split the costs dictate: on synthetic costs where the answer is known by
arithmetic (which pool is the bottleneck, and how many devices it needs), the search over every P:D split and
colocated replica count within the budget picks it; the command line reads a JSONL trace and refuses bad input."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.plan import clusters, dataset_workload, main, search
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.simulator import CalibratedCost, SimRequest

CFG = SchedulerConfig(policy="chunked", starvation_timeout=float("inf"), max_preemptions=None)


def uniform(rate: float, n: int, prompt: int, output: int) -> list[SimRequest]:
    """Evenly spaced arrivals: no queueing from bursts, so capacity alone decides."""
    return [SimRequest(f"r{i}", i / rate, prompt, output) for i in range(n)]


def test_clusters_cover_the_budget():
    cs = clusters(4)
    splits = sorted((c.prefill, c.decode) for c in cs if c.disaggregated)
    assert splits == [(p, d) for p in range(1, 4) for d in range(1, 5 - p)]  # P + D <= 4, both >= 1
    assert sorted(c.devices for c in cs if not c.disaggregated) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        clusters(0)


def test_prefill_heavy_needs_three_prefill_devices():
    # Each 100-token prompt costs 1 s of prefill; at 2.5 req/s the prefill pool needs 2.5 devices' work, so
    # 3 prefill devices (2 fall behind without bound). Decode is cheap: one decode device holds every
    # stream within the TPOT SLO. Colocated, every decode stream stalls for others' 1-s prefills and misses
    # the tight TPOT SLO. Within 4 devices the answer is 3P+1D.
    wl = uniform(2.5, 60, 100, 200)
    plan = search(wl, 4, CFG, CalibratedCost(0.010, 0.010, 0.001), {"ttft": 2.0, "tpot": 0.025})
    assert (plan.best.prefill, plan.best.decode) == (3, 1), [r.name for r in plan.rows]
    assert plan.best.attainment == 1.0
    by = {r.name: r for r in plan.rows}
    assert by["2P+2D"].attainment < 0.5 and by["coloc x4"].attainment < 0.5
    assert plan.rows[0] is plan.best and len(plan.rows) == len(clusters(4))


def test_decode_heavy_needs_three_decode_devices():
    # Cheap 20-token prefills, but each decode step costs 5 ms + 4 ms per sequence in the batch: ~55
    # sequences decode at once at 4 req/s x 200 tokens, so a TPOT of 45 ms needs them spread over 3 decode
    # devices (2 give ~27 a batch: 5 + 4 x 27 > 45 ms). The best split of 4 devices is 1P+3D.
    wl = uniform(4, 60, 20, 200)
    plan = search(wl, 4, CFG, CalibratedCost(0.005, 0.001, 0.004), {"ttft": 1.0, "tpot": 0.045}, colocated=False)
    assert (plan.best.prefill, plan.best.decode) == (1, 3), [r.name for r in plan.rows]
    assert all(r.prefill > 0 for r in plan.rows)


def test_ties_go_to_fewer_devices():
    # A light load: every configuration that meets the SLOs serves the same requests, so the fewest devices win.
    wl = uniform(0.5, 20, 50, 20)
    plan = search(wl, 4, CFG, CalibratedCost(0.005, 0.001, 0.001), {"ttft": 1.0, "tpot": 0.1}, tolerance=0.05)
    assert plan.best.devices == 1 and plan.best.name == "coloc x1"


def test_dataset_workload_is_bench_serves():
    a = dataset_workload("mixed", 2.0, 50, 64, 32, seed=3, long_input_len=500, long_fraction=0.2)
    b = dataset_workload("mixed", 2.0, 50, 64, 32, seed=3, long_input_len=500, long_fraction=0.2)
    assert a == b and len(a) == 50
    assert {r.prompt_tokens for r in a} == {64, 500}
    assert all(x.arrival < y.arrival for x, y in zip(a, a[1:], strict=False))
    with pytest.raises(ValueError):
        dataset_workload("multiturn", 1.0, 5, 8, 8)


def test_cli_reads_a_trace_and_prints_json(tmp_path, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"step_overhead_s": 0.01, "prefill_token_s": 0.01, "decode_token_s": 0.001}))
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"arrival": r.arrival, "prompt_tokens": r.prompt_tokens,
                                         "output_tokens": r.output_tokens}) + "\n"
                             for r in uniform(2.5, 60, 100, 200)))
    assert main(["--workload", str(trace), "--costs", str(costs), "--devices", "4",
                 "--goodput", "ttft:2000", "tpot:25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["best"]["prefill"], out["best"]["decode"]) == (3, 1)
    assert len(out["rows"]) == 10 and out["slos_ms"] == {"ttft": 2000.0, "tpot": 25.0}


@pytest.mark.parametrize("argv", [["--goodput", "latency:5"], ["--devices", "0"], ["--workload", "nonesuch"]])
def test_cli_refuses_bad_input(tmp_path, argv, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"step_overhead_s": 0.01, "prefill_token_s": 0.01, "decode_token_s": 0.001}))
    base = {"--workload": "random", "--devices": "2", "--goodput": "ttft:1000"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    with pytest.raises(SystemExit) as e:
        main([x for kv in base.items() for x in kv] + ["--costs", str(costs), "--num-prompts", "5"])
    assert e.value.code == 2
    assert "pdserve plan:" in capsys.readouterr().err
