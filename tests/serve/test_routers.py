"""Several router replicas over one pool manager (`serve.routers`, `router.control`): two routers on one
cluster serve interleaved streams with the bare engine's exact greedy text; scaling asked of either
replica happens once and both see it, and a drained worker is drained, not failed; /metrics/targets on
each lists both; killing one replica mid-load breaks its own clients' connections only: the other's
streams finish exact, the pools keep the same workers, and every KV block comes back. The SLA planner,
which runs in replica 0, decides on both replicas' load: traffic through replica 1 alone shows in its input."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest

from pdserve.engine.config import PdserveConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.messages import WorkerStats
from pdserve.engine.sampling import SamplingParams
from tests.helpers import EXACT, stream_completion, wait_for, wait_kv_free

PROMPT = "Once upon a time, in a land far away"
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def expected(tiny_text_model_dir):
    engine = LLMEngine(PdserveConfig().replace(model={"model": str(tiny_text_model_dir), **EXACT}))
    cache: dict[int, str] = {}

    def text(max_tokens: int) -> str:
        if max_tokens not in cache:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            cache[max_tokens] = engine.generate([PROMPT], params)[0].output_text
        return cache[max_tokens]

    return text


class Deployment:
    """A pool manager and two router replicas on the session's Ray cluster."""

    def __init__(self, ray, model_dir, autoscale: dict | None = None, **serve):
        from pdserve.router.actor import launch_deployment

        self.ray = ray
        cfg = PdserveConfig().replace(
            model={"model": str(model_dir), **EXACT}, cache={"num_kv_blocks": 256}, engine={"num_threads": 1},
            serve={"port": 0, "routers": 2, "disaggregation": "always", "health_interval_s": 0.2,
                   "admin_key": "admin-secret", **serve}, autoscale=autoscale or {})
        self.pools, self.routers = launch_deployment(cfg)
        self.urls = ray.get([r.start.remote() for r in self.routers], timeout=120)

    def stats(self) -> dict[str, WorkerStats]:
        return self.ray.get(self.pools.worker_stats.remote())

    def worker_ids(self) -> set[str]:
        return {w["worker_id"] for ws in self.ray.get(self.pools.status.remote()).values() for w in ws}

    def wait_kv_free(self, timeout: float = 15.0) -> None:
        wait_kv_free(self.stats, self.worker_ids, timeout)

    def stop(self) -> None:
        for r in self.routers:
            with contextlib.suppress(Exception):  # the test killed it
                self.ray.get(r.stop.remote(), timeout=30)
            self.ray.kill(r)
        self.ray.get(self.pools.stop.remote(), timeout=60)
        self.ray.kill(self.pools)


def stream(url: str, max_tokens: int, started: threading.Event | None = None) -> tuple[str, dict | None]:
    """A streamed completion: (text, the error chunk or None). `started` is set at the first chunk."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    text, error, _ = stream_completion(url, body, started and (lambda i: started.set()))
    return text, error


def run_all(calls) -> list:
    """Run each `(fn, args)` on its own thread; their results, or the exceptions they raised."""
    out: list = [None] * len(calls)

    def one(i, fn, args):
        try:
            out[i] = fn(*args)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i, fn, args)) for i, (fn, args) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def pools_seen(url: str) -> dict[str, list[str]]:
    """The routable workers per role as one replica sees them (its admin status)."""
    st = httpx.get(f"{url}/admin/status", headers=ADMIN, timeout=10).json()
    return {role: sorted(w["worker_id"] for w in ws if w["healthy"] and not w["draining"]) for role, ws in st.items()}


@pytest.fixture(scope="module")
def two(ray_cluster, tiny_text_model_dir):
    dep = Deployment(ray_cluster, tiny_text_model_dir)
    yield dep
    dep.stop()


def test_two_routers_serve_interleaved_streams_exactly(two, expected):
    lengths = [40, 90, 60, 120, 75, 30]
    calls = [(stream, (two.urls[i % 2], n)) for i, n in enumerate(lengths)]
    for (text, error), n in zip(run_all(calls), lengths, strict=True):
        assert error is None and text == expected(n)
    for url in two.urls:  # each replica lists both as scrape targets
        groups = httpx.get(f"{url}/metrics/targets", timeout=10).json()
        routers = next(g["targets"] for g in groups if g["labels"]["role"] == "router")
        assert sorted(routers) == sorted(u.removeprefix("http://") for u in two.urls)
    two.wait_kv_free()


def test_scale_and_drain_through_either_router(two, expected):
    before = pools_seen(two.urls[0])
    assert len(before["decode"]) == 1
    r = httpx.post(f"{two.urls[1]}/admin/scale", json={"decode": 2}, headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    wait_for(lambda: len(pools_seen(two.urls[0])["decode"]) == 2, 10, "router 0 seeing the decode worker "
             "scaled up through router 1")
    assert pools_seen(two.urls[1]) == pools_seen(two.urls[0])
    assert len(two.stats()) == 3  # scaled once, not once per replica
    # a stream through router 1 while router 0 scales decode back to 1: whichever worker is drained lets it
    # finish (drained, not failed), and both replicas converge on the same single decode worker
    started = threading.Event()
    result: list = []
    t = threading.Thread(target=lambda: result.append(stream(two.urls[1], 600, started)))
    t.start()
    assert started.wait(30)
    r = httpx.post(f"{two.urls[0]}/admin/scale", json={"decode": 1}, headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    t.join(60)
    assert result and result[0] == (expected(600), None)
    wait_for(lambda: len(pools_seen(two.urls[1])["decode"]) == 1 and len(two.stats()) == 2, 20,
             "the drained decode worker gone")
    assert pools_seen(two.urls[0]) == pools_seen(two.urls[1])
    failures = httpx.get(f"{two.urls[1]}/metrics", timeout=10).text
    assert "pdserve_worker_failures_total{" not in failures  # drained, not failed
    two.wait_kv_free()


def test_a_router_killed_mid_load_costs_only_its_own_clients(ray_cluster, tiny_text_model_dir, expected):
    dep = Deployment(ray_cluster, tiny_text_model_dir)
    try:
        workers = set(dep.stats())
        n = 3
        started = [threading.Event() for _ in range(2 * n)]
        # long enough that router 0's streams are still running when it is killed, however fast the machine
        calls = [(stream, (dep.urls[i % 2], 900, started[i])) for i in range(2 * n)]
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(run_all(calls)))
        runner.start()
        for ev in started:
            assert ev.wait(30), "a stream did not start"
        dep.ray.kill(dep.routers[0], no_restart=True)
        runner.join(120)
        killed, kept = results[0::2], results[1::2]
        assert all(isinstance(r, httpx.HTTPError) for r in killed), killed  # their connections broke
        for r in kept:
            assert not isinstance(r, Exception), r
            assert r == (expected(900), None)
        assert set(dep.stats()) == workers  # the pools are untouched
        dep.wait_kv_free()
        text, error = stream(dep.urls[1], 20)  # the survivor still serves
        assert error is None and text == expected(20)
        t0 = time.monotonic()
        assert httpx.get(f"{dep.urls[1]}/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 5
    finally:
        dep.stop()


def test_the_planner_in_replica_0_sees_the_load_through_replica_1(ray_cluster, tiny_text_model_dir, tmp_path):
    import json

    costs = tmp_path / "costs.json"  # the planner waits for costs; these keep one worker per pool enough
    costs.write_text(json.dumps({"step_overhead_s": 0.001, "prefill_token_s": 1e-6, "decode_token_s": 1e-6}))
    dep = Deployment(ray_cluster, tiny_text_model_dir, autoscale={
        "enabled": True, "interval_s": 0.2, "window_s": 60.0, "costs": str(costs), "request_resources": False})
    try:
        max_tokens = 8
        for _ in range(6):  # through replica 1 only
            text, error = stream(dep.urls[1], max_tokens)
            assert error is None and text
        prompt_tokens = httpx.post(f"{dep.urls[1]}/tokenize", json={"prompt": PROMPT}, timeout=10).json()["count"]

        def signals() -> dict | None:
            return dep.ray.get(dep.routers[0].status.remote())["autoscale_signals"]

        # replica 1's requests, their prompt tokens and outputs, and the TTFT and TPOT they saw, in the input of
        # the planner running in replica 0
        wait_for(lambda: (s := signals()) is not None and s["request_rate"] > 0 and s["ttft_s"] is not None
                 and s["tpot_s"] is not None, 20, "the planner seeing replica 1's requests")
        s = signals()
        assert s["prompt_tokens_per_s"] / s["request_rate"] == pytest.approx(prompt_tokens)
        assert s["output_tokens"] == pytest.approx(max_tokens)
        assert dep.ray.get(dep.routers[1].status.remote())["autoscale_signals"] is None  # one planner
    finally:
        dep.stop()
