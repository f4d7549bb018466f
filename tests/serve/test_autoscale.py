"""`pdserve serve --autoscale` live: under a prefill-heavy load step the SLA planner grows the prefill pool
(not the decode pool) through the scale path, exports its desired and current sizes, shrinks it back once the
load is gone, never past its max, and no request is lost while workers come and go.

The cost model is a calibration file whose prefill cost is large (the tiny model's real speed would need
minutes of load on two shared cores to show a shortage): the planner's arithmetic then needs the max
prefill pool for any steady prompt load, and one decode worker."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import pytest

from tests.helpers import Server, metric, wait_for

pytestmark = pytest.mark.slow


def pool_sizes(server: Server) -> dict[str, int]:
    pools = server.ray.get(server.actor.status.remote())["pools"]
    return {role: sum(not w["draining"] for w in ws) for role, ws in pools.items()}


def test_load_step_grows_the_prefill_pool_and_shrinks_it_back(ray_cluster, tiny_text_model_dir, tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"step_overhead_s": 0.001, "prefill_token_s": 0.05, "decode_token_s": 0.0001}))
    server = Server(ray_cluster, tiny_text_model_dir, serve={"mode": "disaggregated"},
                    autoscale={"enabled": True, "max_prefill": 2, "max_decode": 2, "interval_s": 0.5,
                               "window_s": 4.0, "cooldown_s": 1.0, "scale_down_after_s": 3.0,
                               "costs": str(costs), "request_resources": False})
    try:
        c = server.client()
        stop = threading.Event()
        sizes_seen = []

        def client(i: int) -> list[int]:
            got = []
            while not stop.is_set():
                r = c.completions.create(model=server.model, prompt=f"load step {i} " * 8, max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
                got.append(r.usage.completion_tokens)
            return got

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client, i) for i in range(4)]
            wait_for(lambda: sizes_seen.append(pool_sizes(server)) or sizes_seen[-1]["prefill"] == 2, 90,
                     "the prefill pool grew to its max")
            wait_for(lambda: metric(server, "pdserve_autoscale_current_workers", role="prefill") == 2, 90,
                     "the second prefill worker joined routing")
            assert metric(server, "pdserve_autoscale_desired_workers", role="prefill") == 2
            assert metric(server, "pdserve_autoscale_desired_workers", role="decode") == 1
            stop.set()
            done = [f.result(timeout=120) for f in futures]
        assert all(n == 8 for got in done for n in got) and sum(map(len, done)) > 4
        wait_for(lambda: sizes_seen.append(pool_sizes(server)) or sizes_seen[-1]["prefill"] == 1, 60,
                 "the prefill pool shrank back once the load was gone")
        assert all(s["prefill"] <= 2 and s["decode"] == 1 for s in sizes_seen), sizes_seen
        assert metric(server, "pdserve_autoscale_decisions_total", role="prefill", action="grow") >= 1
        assert metric(server, "pdserve_autoscale_decisions_total", role="prefill", action="shrink") >= 1
        assert httpx.get(f"{server.url}/health").status_code == 200
        server.wait_kv_free()
    finally:
        server.stop()
