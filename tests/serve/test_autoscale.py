"""`pdserve serve --autoscale` live: a prefill-heavy load step grows the prefill pool (not the decode pool)
through the scale path, then a decode-heavy one grows the decode pool while the prefill pool shrinks back;
with no load both return to their minimum; never past min or max, the desired and current sizes exported, and
no request lost (every answer has its full token count) while workers come and go.

The cost model is a calibration file with inflated costs (the tiny model's real speed would need minutes of
load on two shared cores to show a shortage, and a second worker there adds no cores): the planner's
arithmetic then needs the max prefill pool for long prompts and the max decode pool for long outputs."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import pytest

from tests.helpers import Server, metric, wait_for

pytestmark = pytest.mark.slow


REASONS: list = []  # the planner's last reasons at each poll (shown when a wait times out)


def pool_sizes(server: Server) -> dict[str, int]:
    status = server.ray.get(server.actor.status.remote())
    if not REASONS or REASONS[-1] != status["autoscale"]:
        REASONS.append(status["autoscale"])
    return {role: sum(not w["draining"] for w in ws) for role, ws in status["pools"].items()}


def test_load_steps_grow_the_right_pool_and_shrink_back(ray_cluster, tiny_text_model_dir, tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"step_overhead_s": 0.001, "prefill_token_s": 0.002, "decode_token_s": 0.05}))
    server = Server(ray_cluster, tiny_text_model_dir, serve={"mode": "disaggregated"},
                    autoscale={"enabled": True, "max_prefill": 2, "max_decode": 2, "interval_s": 0.5,
                               "window_s": 3.0, "cooldown_s": 1.0, "scale_down_after_s": 2.0,
                               "costs": str(costs), "request_resources": False})
    try:
        c = server.client()
        seen: list[dict[str, int]] = []

        def wait(predicate, timeout: float, what: str) -> None:
            try:
                wait_for(predicate, timeout, what)
            except pytest.fail.Exception as e:
                pytest.fail(f"{e}; sizes {seen[-3:]}; the planner's last reasons {REASONS[-4:]}")

        def sizes() -> dict[str, int]:
            seen.append(pool_sizes(server))
            return seen[-1]

        def load(prompt: str, max_tokens: int, until) -> list[int]:
            """Four clients in a closed loop until `until` holds; every answer's completion token count."""
            stop = threading.Event()

            def client(i: int) -> list[int]:
                got = []
                while not stop.is_set():
                    r = c.completions.create(model=server.model, prompt=prompt.format(i=i), max_tokens=max_tokens,
                                             temperature=0, extra_body={"ignore_eos": True})
                    got.append(r.usage.completion_tokens)
                return got

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(client, i) for i in range(4)]
                try:
                    until()
                finally:
                    stop.set()
                return [n for f in futures for n in f.result(timeout=120)]

        # prefill-heavy: ~90-token prompts at 2 ms a token (tens of requests/s), one output token (no decode work)
        def prefill_grew():
            wait(lambda: sizes()["prefill"] == 2, 90, "the prefill pool grew to its max")
            wait_for(lambda: metric(server, "pdserve_autoscale_current_workers", role="prefill") == 2, 90,
                     "the second prefill worker joined routing")
            assert metric(server, "pdserve_autoscale_desired_workers", role="decode") == 1

        got = load("load step {i} " * 30, 1, prefill_grew)
        assert got and all(n == 1 for n in got)
        assert all(s["decode"] == 1 for s in seen), seen
        phase1 = len(seen)

        # decode-heavy: one-word prompts, 32 output tokens at 50 ms a sequence-token
        got = load("x{i}", 32, lambda: wait(lambda: sizes()["decode"] == 2 and seen[-1]["prefill"] == 1, 90,
                                                 "the decode pool grew and the prefill pool shrank back"))
        assert got and all(n == 32 for n in got)
        wait(lambda: sizes() == {"prefill": 1, "decode": 1}, 60, "both pools back at their minimum")
        assert all(1 <= s["prefill"] <= 2 and 1 <= s["decode"] <= 2 for s in seen), seen
        assert all(s["prefill"] <= 2 for s in seen[phase1:])
        for role in ("prefill", "decode"):
            for action in ("grow", "shrink"):
                assert metric(server, "pdserve_autoscale_decisions_total", role=role, action=action) >= 1
        assert httpx.get(f"{server.url}/health").status_code == 200
        server.wait_kv_free()
    finally:
        server.stop()
