"""A router replica's mirror of the worker pools, which the pool manager (`router.control`) owns.

`PoolView` keeps, per role, a `WorkerState` for every worker the manager lists, with the manager's
health, draining flag and load figures, plus what only this replica knows: its own requests in flight
on each worker (routing's queue depths) and its prefix index (which prefixes it sent where). A watch
loop refreshes the mirror whenever the pools change and reports those in-flight counts back (a drain
waits for them). A worker this replica sees die under a request leaves its routing at once and is
reported (`fail_worker`); the manager replaces it, once, whichever replica saw it first.

Each watch also carries this replica's load since its previous one (`LoadReport`: arrivals, completions,
its TTFT and TPOT histograms, the prompt tokens it has queued at prefill workers); the manager sums every
replica's, and the SLA planner (in one replica) reads that sum (`cluster_load`), so it decides on the whole
deployment's load, not on the traffic of the replica it runs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from pdserve.engine.config import PdserveConfig
from pdserve.router.metrics import RouterMetrics, histogram_buckets
from pdserve.router.planner import ClusterLoad, LoadReport, LoadWindow
from pdserve.router.pools import WorkerState, worker_status
from pdserve.router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)


class PoolView:
    def __init__(self, config: PdserveConfig, metrics: RouterMetrics, model_name: str, manager, replica: str):
        self.serve = config.serve
        self.metrics = metrics
        self.model_name = model_name
        self.manager = manager
        self.replica = replica  # this replica's name (stable across its restarts)
        self.pools: dict[str, dict[str, WorkerState]] = {"prefill": {}, "decode": {}}
        self.index = PrefixIndex()
        self.version = -1  # the pools' version this mirror holds
        self.replicas: tuple[str, ...] = ()  # every live replica's URL (the scrape targets)
        self.target: dict[str, int] = {"prefill": 0, "decode": 0}  # the manager's pool sizes
        self.bundles: dict[str, dict[str, float]] = {}  # role -> the resources one worker takes
        self.url = ""
        self._failed: set[str] = set()  # failed here, not yet gone from the manager's pools
        self._dispatched: dict[str, int] = {}  # worker id -> its num_dispatched at the previous refresh
        self._failures: dict[tuple[str, str], int] = {}  # the manager's failure counts already counted here
        self._task: asyncio.Task | None = None
        self.load = LoadWindow()  # this replica's arrivals and completions (`Router.generate` records them)
        self._reported = (0, 0)  # of them, how many went to the manager already
        self.incarnation = uuid.uuid4().hex[:8]  # this process's (a restart's metrics count from zero)

    async def start(self, url: str) -> None:
        """Wait for the pools to be filled, take a first snapshot and keep the mirror fresh."""
        self.url = url
        await self.manager.start.remote()
        self.apply(await self.manager.watch.remote(self.replica, url, self.version, {}))
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.manager.leave.remote(self.replica), 10)

    async def _watch(self) -> None:
        while True:
            try:
                snap = await self.manager.watch.remote(self.replica, self.url, self.version, self._inflight(),
                                                       self.report())
            except Exception as e:  # the manager is being restarted: keep routing on the last view
                logger.warning("pool manager unreachable (%s); retrying", type(e).__name__)
                await asyncio.sleep(min(1.0, self.serve.health_interval_s))
                continue
            self.apply(snap)

    def report(self) -> LoadReport:
        """This replica's load since the last report (the arrivals and completions it has not sent yet)."""
        now = time.monotonic()
        arrivals, finished = self.load.since(*self._reported)
        self._reported = self.load.counts
        queued = sum(w.inflight_tokens for w in self.pools["prefill"].values())
        return LoadReport(tuple((now - t, a, b) for t, a, b in arrivals),
                          tuple((now - t, a, b) for t, a, b in finished),
                          histogram_buckets(self.metrics.ttft), histogram_buckets(self.metrics.tpot), queued,
                          self.incarnation)

    async def cluster_load(self, window_s: float, since_s: float) -> ClusterLoad:
        """Every replica's load summed by the manager (this one's as of now): rates over the last `window_s`
        (or the last `since_s`, when shorter)."""
        return await self.manager.cluster_load.remote(self.replica, self.report(), window_s, since_s)

    def _inflight(self) -> dict[str, int]:
        return {w.worker_id: w.inflight_requests for pool in self.pools.values() for w in pool.values()
                if w.inflight_requests}

    def apply(self, snap) -> None:
        """Bring the mirror to `snap` (a `PoolSnapshot`), keeping this replica's own figures."""
        listed: set[str] = set()
        for v in snap.workers:
            listed.add(v.worker_id)
            if v.worker_id in self._failed:
                continue
            pool = self.pools[v.role]
            w = pool.get(v.worker_id)
            if w is None:
                w = pool[v.worker_id] = WorkerState(v.worker_id, v.role, v.handle, info=v.info, stats=v.stats)
                self.index.add_worker(v.worker_id, v.info.num_blocks or v.stats.num_blocks)
            elif (w.stats is not v.stats and not w.inflight_requests
                  and w.num_dispatched == self._dispatched.get(v.worker_id)):
                # nothing routed there since the last report: it covers every request this replica sent
                self.index.reconcile(v.worker_id, v.stats.num_cached_blocks)
            w.stats, w.healthy, w.draining = v.stats, v.healthy, v.draining
            self._dispatched[v.worker_id] = w.num_dispatched
        for pool in self.pools.values():
            for worker_id in [k for k in pool if k not in listed]:
                pool.pop(worker_id).healthy = False
                self.index.drop(worker_id)
                self._dispatched.pop(worker_id, None)
        self._failed &= listed
        for role, reason, n in snap.failures:
            new = n - self._failures.get((role, reason), 0)
            if new > 0:
                self.metrics.worker_failures.labels(self.model_name, role, reason).inc(new)
            self._failures[(role, reason)] = n
        self.version, self.replicas = snap.version, snap.replicas
        self.target.update(snap.target)
        self.bundles = {role: dict(b) for role, b in snap.bundles}

    def ready(self) -> bool:
        """Every pool the mode needs has a routable worker."""
        need = ["decode"] + (["prefill"] if self.serve.mode == "disaggregated" else [])
        return all(any(w.routable for w in self.pools[role].values()) for role in need)

    def fail_worker(self, w: WorkerState, reason: str) -> None:
        """`w` failed under one of this replica's requests: out of its routing now; the manager replaces it."""
        if self.pools[w.role].get(w.worker_id) is not w:
            return
        del self.pools[w.role][w.worker_id]
        w.healthy = False
        self.index.drop(w.worker_id)
        self._failed.add(w.worker_id)
        self.manager.report_failure.remote(w.worker_id, reason)

    async def scale(self, prefill: int | None = None, decode: int | None = None) -> dict:
        """Resize the pools (in the manager: once, for every replica); answers once this mirror shows it."""
        status = await self.manager.scale.remote(prefill, decode)
        self.apply(await self.manager.watch.remote(self.replica, self.url, -1, self._inflight()))
        return status

    def status(self) -> dict:
        """Per role, each worker as this replica routes to it (`inflight`: this replica's requests there)."""
        return {role: [worker_status(w, self.index.size(w.worker_id)) for w in pool.values()]
                for role, pool in self.pools.items()}
