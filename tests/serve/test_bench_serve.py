"""`pdserve bench serve`: its arrival process, statistics, goodput, SSE parsing and error accounting,
then one short run against a live `pdserve serve` whose counts must match what was sent."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench import serve as B
from tests.helpers import Server

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_have_the_requested_rate_and_burstiness(burstiness):
    rate = 20.0
    t = B.arrival_times(20_000, rate, burstiness, random.Random(1))
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 1 / rate) / (1 / rate) < 0.03
    cv = gaps.std() / gaps.mean()  # gamma: CV = 1/sqrt(shape); Poisson (shape 1) has CV 1
    assert abs(cv - 1 / math.sqrt(burstiness)) / (1 / math.sqrt(burstiness)) < 0.06
    assert B.arrival_times(5, math.inf, 1.0, random.Random(1)) == [0.0] * 5


def test_arrivals_are_repeatable_with_a_seed():
    assert B.arrival_times(50, 3.0, 1.0, random.Random(7)) == B.arrival_times(50, 3.0, 1.0, random.Random(7))


def test_percentiles_match_numpy():
    rng = random.Random(3)
    for n in (1, 2, 7, 100, 1001):
        v = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert B.percentile(v, q) == pytest.approx(float(np.percentile(v, q)), rel=1e-12)
    s = B.summary_ms([0.1, 0.2, 0.3])
    assert s["mean"] == pytest.approx(200.0) and s["p50"] == pytest.approx(200.0)


def _result(ok=True, ttft=0.1, e2e=1.0, out=10, klass="default", error=""):
    r = B.Result(B.RequestSpec("p", out, klass=klass), ok=ok, ttft=ttft, e2e=e2e, output_tokens=out, error=error)
    return r


def test_goodput_counts_only_requests_meeting_every_slo():
    slos = B.parse_goodput(["ttft:200", "tpot:50"])
    assert slos == {"ttft": 0.2, "tpot": 0.05}
    results = [_result(ttft=0.1, e2e=0.5, out=11),  # tpot 40 ms: meets both
               _result(ttft=0.3, e2e=0.5, out=11),  # ttft misses
               _result(ttft=0.1, e2e=1.1, out=11),  # tpot 100 ms misses
               _result(ok=False, error="HTTP 503")]  # failed: never counts
    rep = B.report(results, 2.0, slos)
    assert rep["goodput"] == pytest.approx(0.5)  # 1 good request in 2 s
    assert rep["completed"] == 3 and rep["failed"] == 1 and rep["errors"] == ["HTTP 503"]
    assert rep["request_throughput"] == pytest.approx(1.5)
    assert rep["output_throughput"] == pytest.approx(33 / 2)
    assert rep["tpot_ms"]["p50"] == pytest.approx(40.0)
    with pytest.raises(ValueError):
        B.parse_goodput(["latency:5"])


def test_per_class_reports():
    results = [_result(klass="urgent", ttft=0.05), _result(klass="background", ttft=0.5),
               _result(klass="background", ok=False, error="x")]
    rep = B.report(results, 1.0, {"ttft": 0.1})
    assert rep["classes"]["urgent"]["goodput"] == 1.0 and rep["classes"]["background"]["goodput"] == 0.0
    assert rep["classes"]["background"]["failed"] == 1
    assert B.parse_classes("urgent:-1:0.2,background:1:0.3") == [("urgent", -1, 0.2), ("background", 1, 0.3)]
    with pytest.raises(ValueError):
        B.parse_classes("a:0:0.7,b:1:0.5")


def test_sse_parsing():
    assert B.parse_sse_line("data: [DONE]") == "[DONE]"
    assert B.parse_sse_line(": keep-alive") is None
    assert B.parse_sse_line("data: {not json") is None
    obj = B.parse_sse_line('data: {"choices": [{"delta": {"content": "hi"}}]}')
    assert B.chunk_text(obj) == "hi"
    assert B.chunk_text({"choices": [{"text": "x"}]}) == "x"
    assert B.chunk_text({"choices": [], "usage": {}}) == ""


def test_mixed_workload_has_long_prompts_and_priority_shares():
    args = _args(dataset_name="mixed", num_prompts=2000, random_input_len=20, mixed_long_input_len=400,
                 mixed_long_fraction=0.1, priority_classes="urgent:-1:0.25")
    specs = B.build_workload(args, random.Random(0))
    long = sum(1 for s in specs if len(s.prompt.split()) == 400)
    assert 150 < long < 250
    urgent = [s for s in specs if s.klass == "urgent"]
    assert 400 < len(urgent) < 600 and all(s.priority == -1 for s in urgent)


def _args(**kw):
    p = __import__("argparse").ArgumentParser()
    B.add_arguments(p)
    args = p.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_live_run_counts_match_and_failures_are_counted(ray_cluster, tiny_text_model_dir, tmp_path):
    server = Server(ray_cluster, tiny_text_model_dir, serve={"min_client_priority": -1})  # the rows' urgent class
    try:
        dataset = tmp_path / "prompts.jsonl"
        rows = [{"prompt": f"short prompt {i}", "output_len": 6, "priority": -1 if i % 3 == 0 else 0}
                for i in range(9)]
        rows.append({"prompt": "x" * 2000, "output_len": 4})  # over the context window: a 400, counted failed
        dataset.write_text("\n".join(json.dumps(r) for r in rows))
        out = subprocess.run(
            [sys.executable, "-m", "pdserve.cli", "bench", "serve", "--base-url", server.url, "--dataset-name",
             "jsonl", "--dataset-path", str(dataset), "--num-prompts", "20", "--request-rate", "50",
             "--max-concurrency", "8", "--seed", "1", "--goodput", "ttft:60000", "--json", "--plot",
             str(tmp_path / "plots")], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        rep = json.loads(out.stdout)
        assert rep["completed"] == 18 and rep["failed"] == 2  # 20 sent: the long row twice
        assert rep["total_output_tokens"] == 18 * 6
        assert any("HTTP 400" in e for e in rep["errors"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(rep[key]) == {"mean", "p50", "p90", "p99"} and rep[key]["p50"] > 0
        assert rep["goodput"] == pytest.approx(rep["request_throughput"])  # a 60 s SLO: every success is good
        assert all(Path(p).stat().st_size > 1000 for p in rep["plots"])
        server.wait_kv_free()
    finally:
        server.stop()
