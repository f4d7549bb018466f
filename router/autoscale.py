"""`pdserve serve --autoscale`: the SLA planner's live loop, on the router actor's event loop.

It runs in one router replica, and decides on every replica's load: every `autoscale.interval_s` it asks the
pool manager for the sum of what the replicas report (`PoolView.cluster_load`, a `router.planner.ClusterLoad`:
their arrivals and completions, their TTFT and TPOT histograms, the prompt tokens they have queued at
prefill workers; each replica reports with every pool watch, this one as of the question) and builds the
planner's `Signals` from it: the rates over `window_s`, the p90 TTFT and TPOT of the observations in that
window (from the summed bucket counts' change), the prompt tokens queued at the pool that prefills (colocated:
the decode workers' own queues) and the requests waiting for a decode slot (each worker's last health
report), and the pools' target sizes. `router.planner.Planner` decides; a changed size goes
through the same scale path as `pdserve scale` (`WorkerPools.scale`: new workers join once loaded, removed
ones drain). When Ray has no free resources for the workers a grown pool adds, it asks Ray's autoscaler for
them (`ray.autoscaler.sdk.request_resources`, with the pool's custom resource, so KubeRay grows that worker
group). Every decision that changes or holds back a size is logged with its reason; steady ticks at debug.
Exported: desired and current workers per pool, and decisions by pool and action (`AutoscaleCollector`).

The cost model: `autoscale.costs` (a calibration JSON), else the workers' own measurements (prefill seconds
per token; decode step seconds at their batch sizes, fitted to overhead + per token as the health reports
come in). Until a worker has measured a step the planner waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from pathlib import Path

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from pdserve.router.planner import (
    ClusterLoad,
    CostModel,
    Decision,
    Planner,
    Signals,
    fit_decode_costs,
    histogram_quantile,
)

logger = logging.getLogger(__name__)


class Autoscaler:
    def __init__(self, router):
        self.router = router
        self.config = router.config.autoscale
        self.colocated = router.serve.mode == "colocated"
        self.fixed_costs = _load_costs(self.config.costs) if self.config.costs else None
        self.planner: Planner | None = None
        self.started = time.monotonic()
        self.decode_samples: list[tuple[int, float]] = []  # (batch, decode step s) from health reports
        self.snapshots: list[tuple[float, dict]] = []  # (time, histogram buckets) for windowed quantiles
        self.last: Decision | None = None
        self.last_signals: Signals | None = None  # what the last decision was made on
        self.counts: dict[tuple[str, str], int] = {}  # (role, action) -> decisions
        self._scaling: asyncio.Task | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                load = await self.router.workers.cluster_load(self.config.window_s, time.monotonic() - self.started)
                self.tick(load)
            except Exception:  # the loop must outlive one bad tick (or a pool manager being restarted)
                logger.exception("autoscale tick failed")

    # -- signals ------------------------------------------------------------------------------------------
    def costs(self) -> CostModel | None:
        if self.fixed_costs:
            return self.fixed_costs
        pools = self.router.pools
        prefilling = pools["decode" if self.colocated else "prefill"].values()
        per_token = [w.stats.prefill_s_per_token for w in prefilling if w.stats.prefill_s_per_token > 0]
        for w in pools["decode"].values():
            if w.stats.decode_step_s > 0 and w.stats.num_running > 0:
                self.decode_samples.append((w.stats.num_running, w.stats.decode_step_s))
        self.decode_samples = self.decode_samples[-500:]
        if not per_token or not self.decode_samples:
            return None
        fit = fit_decode_costs(self.decode_samples)
        if fit is None:  # one batch size seen so far: half the step as overhead, half as per-sequence cost
            b, t = self.decode_samples[-1]
            fit = (t / 2, t / 2 / b)
        return CostModel(fit[0], statistics.median(per_token), fit[1])

    def _quantiles(self, now: float, load: ClusterLoad) -> tuple[float | None, float | None]:
        """The p90 TTFT and TPOT of the observations in the last window (the summed histograms' bucket deltas)."""
        cur = {"ttft": load.ttft, "tpot": load.tpot}
        self.snapshots.append((now, cur))
        while len(self.snapshots) > 1 and self.snapshots[1][0] <= now - self.config.window_s:
            self.snapshots.pop(0)
        base = self.snapshots[0][1]
        out = []
        for name in ("ttft", "tpot"):
            old = dict(base[name])
            out.append(histogram_quantile([(le, n - old.get(le, 0.0)) for le, n in cur[name]], 0.9))
        return out[0], out[1]

    def signals(self, now: float, load: ClusterLoad) -> Signals:
        r = self.router
        ttft, tpot = self._quantiles(now, load)
        pools = r.pools
        if self.colocated:
            queued = sum(w.stats.waiting_tokens for w in pools["decode"].values())
        else:
            queued = load.prefill_queue_tokens
        waiting = 0 if self.colocated else sum(w.stats.num_waiting for w in pools["decode"].values())
        target = r.workers.target
        return Signals(now=now, prefill=target["prefill"], decode=target["decode"], request_rate=load.request_rate,
                       prompt_tokens_per_s=load.prompt_tokens_per_s, output_tokens=load.output_tokens,
                       prefill_queue_tokens=queued,
                       decode_waiting=waiting, ttft_s=ttft, tpot_s=tpot, colocated=self.colocated)

    # -- the decision -------------------------------------------------------------------------------------
    def tick(self, load: ClusterLoad) -> Decision | None:
        now = time.monotonic()
        if self._scaling is not None and not self._scaling.done():
            return None  # the previous resize is still starting workers: its targets stand
        costs = self.costs()
        if costs is None:
            logger.debug("autoscale: waiting for the workers' first measured steps")
            return None
        if self.planner is None:
            self.planner = Planner(self.config, costs)
        self.planner.costs = costs
        self.last_signals = self.signals(now, load)
        d = self.planner.decide(self.last_signals)
        self.last = d
        current = dict(self.router.workers.target)
        for role, why in d.reasons.items():
            if self.colocated and role == "prefill":
                continue
            action = ("grow" if d.size(role) > current[role] else "shrink" if d.size(role) < current[role]
                      else "hold" if why.startswith("hold") else "steady")
            self.counts[(role, action)] = self.counts.get((role, action), 0) + 1
            if action != "steady":
                logger.info("autoscale %s: %s", role, why)
            else:
                logger.debug("autoscale %s: %s", role, why)
        if d.changed:
            grow = {role: d.size(role) - current[role] for role in d.changed}
            self._request_resources(grow, d)
            self._scaling = asyncio.ensure_future(self._scale(d))
        return d

    async def _scale(self, d: Decision) -> None:
        try:
            await self.router.scale(prefill=None if self.colocated else d.prefill, decode=d.decode)
        except Exception:
            logger.exception("autoscale: resizing to %dP+%dD failed", d.prefill, d.decode)

    def _request_resources(self, grow: dict[str, int], d: Decision) -> None:
        """Ask Ray's autoscaler for every worker the pools will hold when the cluster lacks room for the new
        ones (request_resources states the whole demand: one bundle per worker)."""
        if not self.config.request_resources or not any(n > 0 for n in grow.values()):
            return
        import ray

        try:
            bundles = self.router.workers.bundles  # from the pool manager
            need = {}
            for role, n in grow.items():
                for key, amount in bundles[role].items():
                    need[key] = need.get(key, 0.0) + amount * max(n, 0)
            free = ray.available_resources()
            if all(free.get(k, 0.0) >= v for k, v in need.items()):
                return
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[bundles["prefill"]] * (0 if self.colocated else d.prefill)
                              + [bundles["decode"]] * d.decode)
            logger.info("autoscale: no room for %s; asked Ray's autoscaler for %d worker bundles",
                        ", ".join(f"{n} more {r}" for r, n in grow.items() if n > 0),
                        (0 if self.colocated else d.prefill) + d.decode)
        except Exception as e:  # no autoscaler on this cluster, ...: the spawns wait for room or time out
            logger.warning("autoscale: request_resources failed: %s", e)


class AutoscaleCollector:
    """Desired (the planner's last decision) and current (routable) workers per pool, and decisions by pool
    and action (grow, shrink, hold, steady), read at scrape time."""

    def __init__(self, prefix: str, model_name: str, autoscaler: Autoscaler):
        self.p, self.model, self.a = prefix, model_name, autoscaler

    def describe(self):
        return []

    def collect(self):
        desired = GaugeMetricFamily(f"{self.p}autoscale_desired_workers", "The SLA planner's pool sizes",
                                    labels=["model_name", "role"])
        current = GaugeMetricFamily(f"{self.p}autoscale_current_workers", "Routable workers per pool",
                                    labels=["model_name", "role"])
        decisions = CounterMetricFamily(f"{self.p}autoscale_decisions", "SLA planner decisions by pool and "
                                        "action (grow, shrink, hold, steady)", labels=["model_name", "role", "action"])
        pools, target = self.a.router.pools, self.a.router.workers.target
        for role in ("prefill", "decode"):
            want = self.a.last.size(role) if self.a.last else target[role]
            desired.add_metric([self.model, role], want)
            current.add_metric([self.model, role], sum(w.routable for w in list(pools[role].values())))
        for (role, action), n in sorted(self.a.counts.items()):
            decisions.add_metric([self.model, role, action], n)
        yield desired
        yield current
        yield decisions


def _load_costs(path: str) -> CostModel:
    d = json.loads(Path(path).read_text())
    return CostModel(float(d["step_overhead_s"]), float(d["prefill_token_s"]), float(d["decode_token_s"]))
