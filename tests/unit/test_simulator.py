"""The simulator replays the reference's toy workload (Table 5.1) through the real
scheduler and shows the behaviour its figures 5.1-5.4 describe."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.simulator import (
    CalibratedCost,
    Cluster,
    SimRequest,
    UnitCost,
    add_arguments,
    poisson_workload,
    run_cli,
    simulate,
    toy_workload,
)


def run(policy: str, **kw):
    cfg = SchedulerConfig(policy=policy, max_num_seqs=4, batch_timeout=2, max_prefill_chunk=1,
                          starvation_timeout=float("inf"), max_preemptions=None, **kw)
    return {r.id: r for r in simulate(toy_workload(), cfg, UnitCost()).requests}


@pytest.fixture(scope="module")
def sims():
    return {p: run(p) for p in ("static", "dynamic", "continuous", "chunked")}


def last(res) -> float:
    return max(r.finish for r in res.values())


def test_static_batch_of_four(sims):
    r = sims["static"]
    # idle until the batch is full at step 4; A-D start together; B holds the batch until 11
    assert {k: r[k].start for k in "ABCD"} == dict.fromkeys("ABCD", 4)
    assert r["B"].finish == 11 and all(r[k].finish <= 11 for k in "ACD")
    # E waits the whole batch out even though slots free up from step 9
    assert r["C"].finish < r["A"].finish and r["E"].start > 11


def test_dynamic_max_four_timeout_two(sims):
    r = sims["dynamic"]
    assert {k: r[k].start for k in "ABC"} == dict.fromkeys("ABC", 2)  # the timeout fires at 2
    assert max(r[k].finish for k in "ABC") == 9
    assert r["D"].start == r["E"].start == 10 and r["D"].finish == 15  # the second batch waits for the first


def test_continuous_max_four(sims):
    r = sims["continuous"]
    assert r["A"].start == 0 and r["D"].start == 4  # A and D start as soon as they arrive
    assert r["E"].start == 8  # E takes the first free slot
    assert last(r) == 12  # all five done by step 12
    assert r["A"].finish < last(sims["static"]) and last(r) < last(sims["dynamic"])


def test_chunked_prefill(sims):
    r, c = sims["chunked"], sims["continuous"]
    assert all(r[k].finish < c[k].finish for k in "ABD")  # A, B and D all complete sooner
    assert last(r) == min(last(s) for s in sims.values())  # it finishes all five soonest
    assert last(r) < min(last(sims[p]) for p in ("static", "dynamic", "continuous"))


def test_ttft_and_throughput_order(sims):
    def summary(p):
        reqs = sims[p]
        ttft = sum(x.first_token + 1 - x.arrival for x in reqs.values()) / 5
        return ttft, last(reqs)
    assert summary("chunked") < summary("continuous") < summary("dynamic")


# decode is weight-bound: a step costs mostly the same whatever its batch (as measured on the engine)
COST = CalibratedCost(step_overhead_s=0.03, prefill_token_s=0.0015, decode_token_s=0.0015)


def test_calibrated_poisson_continuous_beats_static():
    # arrivals faster than service: capacity, not the arrival process, sets the makespan
    wl = poisson_workload(rate=20.0, n=40, prompt_lens=(32, 256), output_lens=(8, 512), seed=1)
    res = {}
    for policy in ("static", "continuous"):
        cfg = SchedulerConfig(policy=policy, max_num_seqs=8, max_num_batched_tokens=2048)
        res[policy] = simulate(wl, cfg, COST).summary()
        assert res[policy]["completed"] == 40
    assert res["continuous"]["throughput"] > 1.1 * res["static"]["throughput"]  # no head-of-line blocking
    assert res["continuous"]["ttft_mean"] < res["static"]["ttft_mean"]


def test_long_prompts_during_decode_chunked_keeps_tpot():
    wl = poisson_workload(rate=1.0, n=24, prompt_lens=(32, 128), output_lens=(64, 128), seed=2)
    wl += [SimRequest(f"long{i}", 5.0 + 6 * i, 2000, 8) for i in range(3)]  # arrive while others decode
    res = {}
    for policy, budget in (("continuous", 2048), ("chunked", 256)):
        cfg = SchedulerConfig(policy=policy, max_num_seqs=16, max_num_batched_tokens=budget, max_prefill_chunk=128)
        res[policy] = simulate(wl, cfg, COST).summary()
    # a whole 2,000-token prefill stalls every decode for ~3 s; 128-token chunks cap the stall near 0.2 s
    assert res["chunked"]["itl_max"] < 0.25 * res["continuous"]["itl_max"]


def test_cli_json_and_gantt(tmp_path):
    png = tmp_path / "gantt.png"
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "simulate", "--workload", "toy", "--policy",
                           "continuous", "--max-num-seqs", "4", "--json", "--plot", str(png)],
                          capture_output=True, text=True, check=True, timeout=120)
    data = json.loads(proc.stdout)
    assert data["policy"] == "continuous"
    by_id = {r["id"]: r for r in data["requests"]}
    assert set(by_id) == set("ABCDE")
    assert by_id["E"]["start"] == 8 and by_id["B"]["finish"] == 11
    assert {"id", "arrival", "start", "first_token", "finish"} <= set(by_id["A"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jsonl_workload(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text("\n".join(json.dumps({"arrival": i, "prompt_tokens": 100, "output_tokens": 5, "priority": i % 2})
                           for i in range(6)))
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "simulate", "--workload", str(f), "--policy",
                           "chunked", "--json"], capture_output=True, text=True, check=True, timeout=120)
    assert len(json.loads(proc.stdout)["requests"]) == 6


# -- several devices: disaggregated (prefill pool + decode pool) and colocated -------------------------------------

# this machine's calibrated profile, rounded (docs/calibrated_costs.json): decode tokens cost more than prefill ones
CAL = CalibratedCost(step_overhead_s=0.025, prefill_token_s=0.0015, decode_token_s=0.0045)
NB = 1 << 14  # KV blocks per instance: room for everything (no preemption), and cheap to build


def mixed(seed: int = 0, n: int = 40, rate: float = 2.0) -> list[SimRequest]:
    """Short requests, 15 % of them with a 1,500-token prompt instead (bench compare's mixed workload, smaller)."""
    return poisson_workload(rate, n, (32, 96), (8, 48), seed, long_prompt=1500, long_fraction=0.15)


def test_disaggregated_conservation():
    wl = mixed() + [SimRequest("one", 3.0, 100, 1)]  # ends on its first token: never leaves the prefill pool
    res = simulate(wl, SchedulerConfig(), CAL, num_blocks=NB, cluster=Cluster(prefill=2, decode=2))
    role = {i.name: i.role for i in res.instances}
    seen = defaultdict(list)
    for t, rid, kind, inst in res.events:
        seen[rid, kind].append((t, role[inst]))
    for r, tr in zip(wl, res.requests, strict=True):
        assert [x[1] for x in seen[r.id, "first_token"]] == ["prefill"]  # exactly one first token, from prefill
        assert len(seen[r.id, "finish"]) == 1  # finishes exactly once
        assert tr.num_output_tokens == r.output_tokens and tr.finish is not None
        if r.output_tokens > 1:
            assert [x[1] for x in seen[r.id, "kv_ready"]] == ["decode"]
            assert seen[r.id, "finish"][0][1] == "decode"
            assert tr.prefill_done <= tr.kv_ready == tr.first_token <= tr.finish
        else:
            assert seen[r.id, "finish"][0][1] == "prefill" and not seen[r.id, "kv_ready"]
    assert res.summary()["completed"] == len(wl)
    # every prompt token prefilled once, in the prefill pool; every later token decoded once, in the decode pool
    steps = {r: [s for i in res.instances if i.role == r for s in i.steps] for r in ("prefill", "decode")}
    assert sum(s.prefill_tokens for s in steps["prefill"]) == sum(r.prompt_tokens for r in wl)
    assert sum(s.decode_tokens for s in steps["decode"]) == sum(r.output_tokens - 1 for r in wl)
    assert all(i.steps for i in res.instances)  # both instances of each pool got work


def test_disaggregated_steps_keep_to_their_pool():
    wl = mixed(seed=3)
    res = simulate(wl, SchedulerConfig(), CAL, num_blocks=NB, cluster=Cluster(prefill=1, decode=1))
    for inst in res.instances:
        for s in inst.steps:
            if inst.role == "decode":
                assert s.prefill_tokens == 0 and s.decode_tokens == s.num_seqs  # one new token per request
            else:
                assert s.decode_tokens == 0
    # the same workload colocated does mix them: the check above can fail
    col = simulate(wl, SchedulerConfig(max_prefill_chunk=256), CAL, num_blocks=NB, cluster=Cluster(devices=2))
    assert any(s.prefill_tokens and s.decode_tokens for i in col.instances for s in i.steps)


def test_disaggregated_ttft_pays_prefill_and_transfer():
    slow = Cluster(prefill=1, decode=1, transfer_gbps=0.5, transfer_latency_s=0.02)
    wl = mixed(seed=1)
    res = simulate(wl, SchedulerConfig(), CAL, num_blocks=NB, cluster=slow)
    for r, tr in zip(wl, res.requests, strict=True):
        xfer = slow.transfer_time(r.prompt_tokens)
        assert tr.ttft(False) >= CAL(r.prompt_tokens, 0) + xfer - 1e-9
        assert tr.kv_ready - tr.prefill_done >= xfer - 1e-9
    alone = simulate([SimRequest("a", 1.0, 1000, 10)], SchedulerConfig(), CAL, num_blocks=NB, cluster=slow).requests[0]
    assert alone.ttft(False) == pytest.approx(CAL(1000, 0) + slow.transfer_time(1000))
    # two prompts prefilled in one step share the prefill instance's link: the second KV waits for the first
    pair = simulate([SimRequest("a", 0.0, 800, 4), SimRequest("b", 0.0, 800, 4)], SchedulerConfig(), CAL,
                    cluster=slow).requests
    assert pair[0].prefill_done == pair[1].prefill_done
    assert pair[1].kv_ready - pair[0].kv_ready == pytest.approx(slow.wire_time(800))


def test_cluster_simulation_is_deterministic():
    def run_once(seed, cluster):
        res = simulate(mixed(seed=seed), SchedulerConfig(max_prefill_chunk=256), CAL, num_blocks=NB, cluster=cluster,
                       slos={"ttft": 3.0, "tpot": 0.2})
        return json.dumps(res.to_json()), res.events

    for cluster in (Cluster(prefill=2, decode=1), Cluster(devices=3)):
        assert run_once(7, cluster) == run_once(7, cluster)
        assert run_once(7, cluster)[0] != run_once(8, cluster)[0]


def test_long_prompt_during_steady_decoding_stalls_colocated_not_disaggregated_decode():
    steady = [SimRequest(f"s{i}", 0.1 * i, 64, 150) for i in range(8)]
    wl = [*steady, SimRequest("long", 2.0, 2000, 8)]  # arrives while the eight decode

    def stall(res):
        return max(r.max_itl for r in res.requests if r.id != "long")

    dis = simulate(wl, SchedulerConfig(), CAL, num_blocks=NB, cluster=Cluster(prefill=1, decode=1))
    col = simulate(wl, SchedulerConfig(policy="continuous"), CAL, num_blocks=NB, cluster=Cluster(devices=2))
    assert stall(dis) <= stall(col)
    assert stall(col) >= CAL(2000, 0)  # a colocated decode step carried the whole prefill
    assert stall(dis) < 0.1 * CAL(2000, 0)  # the decode pool never saw it: steps of decode tokens only


def test_goodput_counts_requests_meeting_every_slo():
    wl = [SimRequest("a", 0.0, 100, 11), SimRequest("b", 10.0, 2000, 11), SimRequest("c", 20.0, 50, 1)]
    res = simulate(wl, SchedulerConfig(policy="continuous"), CAL, num_blocks=NB)
    a, b, c = res.requests
    assert a.ttft(False) == pytest.approx(CAL(100, 0)) and b.ttft(False) == pytest.approx(CAL(2000, 0))
    s = res.summary({"ttft": 1.0, "tpot": 0.1})  # b's 3 s prefill misses the TTFT SLO; c has no TPOT, it counts
    assert s["good"] == 2 and s["slo_attainment"] == pytest.approx(2 / 3)
    assert s["goodput"] == pytest.approx(2 / (c.finish - 0.0))
    assert res.summary({"tpot": CAL(0, 1) * 0.9})["good"] == 1  # only c: the others' TPOT is one decode step
    assert "goodput" not in res.summary()


def test_round_robin_and_least_loaded_routing():
    wl = [SimRequest(f"r{i}", 0.0, 100, 4) for i in range(6)]
    rr = simulate(wl, SchedulerConfig(), CAL, num_blocks=NB, cluster=Cluster(devices=3, router="round-robin"))
    assert [r.instance for r in rr.requests] == ["device0", "device1", "device2"] * 2
    big = [SimRequest("big", 0.0, 1500, 4), *(SimRequest(f"s{i}", 0.0, 50, 4) for i in range(3))]
    ll = simulate(big, SchedulerConfig(), CAL, num_blocks=NB, cluster=Cluster(devices=2))
    assert [r.instance for r in ll.requests] == ["device0", "device1", "device1", "device1"]
    with pytest.raises(ValueError):
        simulate(wl, SchedulerConfig(policy="static"), CAL, num_blocks=NB, cluster=Cluster(prefill=1, decode=1))
    with pytest.raises(ValueError):
        Cluster(prefill=1, decode=0)


COSTS = Path(__file__).resolve().parents[2] / "docs" / "calibrated_costs.json"  # from any working directory


def test_cli_disaggregated_json(capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--workload", "poisson", "--rate", "2", "--num-requests", "30", "--prompt-lens", "64", "64",
            "--output-lens", "16", "16", "--long-prompt-len", "1500", "--long-fraction", "0.1", "--policy", "chunked",
            "--max-num-seqs", "64", "--costs", str(COSTS), "--goodput", "ttft:3000", "tpot:200",
            "--json"]
    assert run_cli(p.parse_args([*argv, "--disaggregated", "1:1", "--transfer-gbps", "50",
                                 "--kv-bytes-per-token", "46080"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "disaggregated" and data["cluster"]["transfer_gbps"] == 50
    assert [i["role"] for i in data["summary"]["instances"]] == ["prefill", "decode"]
    assert data["summary"]["completed"] == 30 and data["summary"]["goodput"] > 0
    assert {r["decode_instance"] for r in data["requests"]} == {"decode0"}
    assert run_cli(p.parse_args([*argv, "--devices", "2"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "colocated" and len(data["summary"]["instances"]) == 2
    assert run_cli(p.parse_args([*argv, "--disaggregated", "1:1", "--devices", "3"])) == 2
    assert run_cli(p.parse_args([*argv, "--disaggregated", "2"])) == 2
