"""`pdserve bench replay`: a peer workload through the bare engine, each request to its exact output length,
with its arrival, first token and end in order; multi-turn workloads refused."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.peer import QUICK_WORKLOADS, load_args
from pdserve.bench.replay import main, replay
from pdserve.bench.serve import build_workload


@pytest.mark.parametrize("workload", ["burst", "poisson"])
def test_replay_runs_the_peer_workload(make_engine, tiny_text_model_dir, workload):
    engine = make_engine(tiny_text_model_dir)
    args = load_args(QUICK_WORKLOADS[workload], "in-process", "", seed=3)
    results, duration = replay(engine, args)
    import random

    specs = build_workload(args, random.Random(3))
    assert [r.spec for r in results] == specs  # the peer harness's requests, in order
    assert all(r.ok and r.output_tokens == r.spec.output_len for r in results)
    assert all(0 <= r.ttft <= r.e2e <= duration and r.prompt_tokens > 0 for r in results)
    assert all(len(r.itl) == r.output_tokens - 1 for r in results)
    starts = [r.start for r in results]
    assert (max(starts) < 0.05) == (workload == "burst")  # a burst arrives at once; Poisson arrivals spread out
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_replay_refuses_multiturn(make_engine, tiny_text_model_dir):
    with pytest.raises(ValueError, match="single-turn"):
        replay(make_engine(tiny_text_model_dir), load_args(QUICK_WORKLOADS["multiturn"], "in-process", "", seed=0))


def test_replay_command(tiny_text_model_dir, capsys):
    assert main(["--quick", "--runs", "2", "--workloads", "burst", "--model", str(tiny_text_model_dir),
                 "--threads", "1", "--dtype", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    burst = out["workloads"]["burst"]
    assert out["runs"] == 2 and out["dtype"] == "float32" and len(burst["reports"]) == 2
    assert burst["completed"] == QUICK_WORKLOADS["burst"]["num_prompts"] and burst["failed"] == 0
    assert burst["output_tok_s"] > 0 and burst["ttft_p50_ms"] <= burst["ttft_p99_ms"]
    with pytest.raises(SystemExit):
        main(["--workloads", "multiturn"])
