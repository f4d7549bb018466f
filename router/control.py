"""The pool manager: the one actor that owns the worker pools, whatever the number of router replicas.

Membership, health checks, self-healing, scaling and draining (`router.workers.WorkerPools`) run here
once; every router replica (`router.server.Router`, through its `router.pool_view.PoolView`) keeps a
mirror of the pools that `watch` refreshes whenever they change (a worker joins, leaves, starts
draining, or a health round brings new load figures) and reports back the requests it has in flight on
each worker (what a drain waits for), its load since its last watch (`LoadReport`, summed here for the SLA
planner: `cluster_load`) and the failures it saw first (a worker's death under a request:
`report_failure`). Scaling asked of any replica lands here (`scale`), so it happens once.

The replicas' requests never pass through here: tokens flow from the decode workers straight to the
replica that started the request. So a replica that dies costs its own clients only, and a pool
manager that Ray restarts adopts the (detached) workers and carries on without breaking a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from pdserve.engine.config import PdserveConfig
from pdserve.engine.messages import WorkerStats
from pdserve.router.metrics import RouterMetrics
from pdserve.router.planner import ClusterLoad, LoadReport, LoadSum
from pdserve.router.workers import WorkerPools, worker_bundle

logger = logging.getLogger(__name__)


def launch_pools(config: PdserveConfig, instance: str | None = None, *, name: str | None = None,
                 namespace: str | None = None, **options):
    """Create the pool manager actor (call `start` on it next). Ray restarts it if its process dies; the
    restarted manager adopts the workers (named after `instance`) and health-checks them again."""
    import ray

    opts = {"num_cpus": 0, "max_concurrency": 10_000, "max_restarts": -1, "max_task_retries": 3, **options}
    if name:
        opts.update(name=name, namespace=namespace)
    return ray.remote(PoolManager).options(**opts).remote(config, instance or uuid.uuid4().hex[:6])


@dataclass
class _Replica:
    """A router replica as the manager knows it: from its last `watch`."""

    url: str
    seen: int = -1  # the pools' version it last received
    inflight: dict[str, int] = field(default_factory=dict)  # worker id -> its requests in flight there
    last: float = 0.0  # monotonic time of its last watch


@dataclass(frozen=True)
class WorkerView:
    """One worker as the routers mirror it (a snapshot; handles travel as Ray handles)."""

    worker_id: str
    role: str
    handle: object
    info: object
    stats: WorkerStats
    healthy: bool
    draining: bool


@dataclass(frozen=True)
class PoolSnapshot:
    """What `watch` answers: the pools as of `version`, the replicas serving them, and the worker
    failures counted so far (by role and reason, for every replica's /metrics)."""

    version: int
    workers: tuple[WorkerView, ...]
    replicas: tuple[str, ...]
    failures: tuple[tuple[str, str, int], ...]
    target: tuple[tuple[str, int], ...] = ()  # role -> the size the pool is kept at (scaling moves it)
    # role -> the resources one worker takes (the SLA planner's request to Ray's autoscaler)
    bundles: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()


class PoolManager:
    """The Ray actor (`launch_pools`) that hosts the `WorkerPools` of a deployment."""

    def __init__(self, config: PdserveConfig, instance: str):
        import ray

        logging.basicConfig(level=logging.INFO)
        self.config = config
        self.serve = config.serve
        self.metrics = RouterMetrics(self.serve.metrics_prefix, "pools", CollectorRegistry())
        self.failures: dict[tuple[str, str], int] = {}
        self.pools = WorkerPools(config, self.metrics, "pools", instance)
        self.pools.drained = self._drained
        self.pools.on_failure = self._count_failure
        self.replicas: dict[str, _Replica] = {}
        self.load = LoadSum()  # every replica's load, for the SLA planner
        self._bundles = None  # PoolSnapshot.bundles, once the cluster's resources are known
        self._started: asyncio.Task | None = None
        ctx = ray.get_runtime_context()
        import warnings

        with warnings.catch_warnings():  # Ray 2.60 reads it through a deprecated state API; still supported
            warnings.simplefilter("ignore")
            self.restarted = ctx.was_current_actor_reconstructed
        if self.restarted:
            logger.warning("pool manager restarted: adopting the workers of instance %s", instance)
            ctx.current_actor.start.remote()

    async def start(self) -> None:
        """Fill the pools and start the health loop (once; every caller waits for the same start)."""
        if self._started is None:
            self._started = asyncio.create_task(self.pools.start(adopt=self.restarted))
        await asyncio.shield(self._started)

    async def watch(self, replica: str, url: str, version: int, inflight: dict[str, int],
                    load: LoadReport | None = None) -> PoolSnapshot:
        """A replica's report (its URL, requests in flight per worker, as of the `version` it holds, and its
        load since its last report); answers the pools once they differ from that version, or after a health
        interval."""
        r = self.replicas.setdefault(replica, _Replica(url))
        r.url, r.seen, r.inflight, r.last = url, version, inflight, time.monotonic()
        if load is not None:
            self.load.add(replica, load, r.last)
        self._sum_inflight()
        await self.pools.changed(version, self.serve.health_interval_s)
        return self.snapshot()

    def snapshot(self) -> PoolSnapshot:
        p = self.pools
        workers = tuple(WorkerView(w.worker_id, w.role, w.handle, w.info, w.stats, w.healthy, w.draining)
                        for pool in p.pools.values() for w in pool.values())
        if self._bundles is None:
            self._bundles = tuple((role, tuple(worker_bundle(p._actor_options(role)).items()))
                                  for role in ("prefill", "decode"))
        return PoolSnapshot(p.version, workers, tuple(r.url for r in self._live_replicas().values() if r.url),
                            tuple((role, reason, n) for (role, reason), n in self.failures.items()),
                            tuple(p.target.items()), self._bundles)

    async def cluster_load(self, replica: str, load: LoadReport, window_s: float, since_s: float) -> ClusterLoad:
        """Every live replica's load summed (`replica`'s as of `load`, which it sends with the question): what
        the SLA planner decides on. Rates over the last `window_s`, or the last `since_s` when shorter."""
        now = time.monotonic()
        self.load.add(replica, load, now)
        return self.load.load(now, window_s, now - since_s, set(self._live_replicas()) | {replica})

    async def leave(self, replica: str) -> None:
        """A replica stops (drained, shut down): it no longer holds drains up or shows in the targets."""
        self.replicas.pop(replica, None)
        self.load.leave(replica)
        self._sum_inflight()
        self.pools.touch()

    async def report_failure(self, worker_id: str, reason: str) -> None:
        """A replica saw `worker_id` fail under a request (it died): out of the pools now, replaced once."""
        w = next((w for pool in self.pools.pools.values() for w in pool.values() if w.worker_id == worker_id), None)
        if w is not None:
            self.pools.fail_worker(w, reason)

    async def scale(self, prefill: int | None = None, decode: int | None = None) -> dict:
        return await self.pools.scale(prefill, decode)

    async def status(self) -> dict:
        return self.pools.status()

    async def worker_stats(self) -> dict[str, WorkerStats]:
        workers = [w for pool in self.pools.pools.values() for w in pool.values()]
        stats = await asyncio.gather(*(w.handle.stats.remote() for w in workers), return_exceptions=True)
        return {w.worker_id: st for w, st in zip(workers, stats, strict=True) if not isinstance(st, BaseException)}

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def stop(self) -> None:
        await self.pools.stop()

    # -- the replicas' load on each worker ----------------------------------------------------------------
    def _live_replicas(self) -> dict[str, _Replica]:
        """Replicas heard from lately: one silent for `stall_timeout_s` is dead or cut off; its requests
        went with it (the decode workers aborted them when its token streams closed)."""
        horizon = time.monotonic() - max(self.serve.stall_timeout_s, 3 * self.serve.health_interval_s)
        return {k: r for k, r in self.replicas.items() if r.last >= horizon}

    def _sum_inflight(self) -> None:
        live = self._live_replicas().values()
        for pool in self.pools.pools.values():
            for w in pool.values():
                w.inflight_requests = sum(r.inflight.get(w.worker_id, 0) for r in live)

    def _drained(self, w, version: int) -> bool:
        """Every live replica has seen `w` draining (routes nothing new there) and has nothing left on it."""
        self._sum_inflight()
        return not w.inflight_requests and all(r.seen >= version for r in self._live_replicas().values())

    def _count_failure(self, role: str, reason: str) -> None:
        self.failures[(role, reason)] = self.failures.get((role, reason), 0) + 1
