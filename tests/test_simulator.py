"""The simulator replays the reference's toy workload (Table 5.1) through the real
scheduler and shows the behaviour its figures 5.1-5.4 describe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.config import SchedulerConfig
from engine.simulator import CalibratedCost, SimRequest, UnitCost, poisson_workload, simulate, toy_workload


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
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "simulate", "--workload", "toy", "--policy",
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
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "simulate", "--workload", str(f), "--policy",
                           "chunked", "--json"], capture_output=True, text=True, check=True, timeout=120)
    assert len(json.loads(proc.stdout)["requests"]) == 6
