"""The router's Ray actor: `launch_router` creates it, `RouterActor` hosts a `Router` (the request
path and the HTTP server) and answers the operator's and the tests' calls (start, drain, scale,
status, a worker's handle, every worker's stats)."""

from __future__ import annotations

import asyncio
import logging
import uuid
import warnings

from pdserve.engine.config import PdserveConfig
from pdserve.engine.messages import WorkerStats
from pdserve.router.server import Router

logger = logging.getLogger(__name__)


def launch_router(config: PdserveConfig, *, name: str | None = None, namespace: str | None = None, **options):
    """Create the router actor (call `start` on it next). Ray restarts it if its process dies; the
    restarted router starts itself, adopts its workers and serves again on the same address."""
    import ray

    opts = {"num_cpus": 0, "max_concurrency": 10_000, "max_restarts": -1, "max_task_retries": 3, **options}
    if name:
        opts.update(name=name, namespace=namespace)
    return ray.remote(RouterActor).options(**opts).remote(config, uuid.uuid4().hex[:6])


class RouterActor:
    """The Ray actor (`launch_router`) that hosts `Router` and its HTTP server."""

    def __init__(self, config: PdserveConfig, instance: str | None = None):
        import ray

        logging.basicConfig(level=logging.INFO)
        self.router = Router(config, instance=instance)
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60 reads it through a deprecated state API; still supported
            warnings.simplefilter("ignore")
            self.restarted = ctx.was_current_actor_reconstructed
        if self.restarted:  # Ray brought this actor back after its process died: serve again unasked
            logger.warning("router restarted: adopting the workers of instance %s", self.router.instance)
            ctx.current_actor.start.remote()

    async def start(self) -> str:
        return await self.router.start(adopt=self.restarted)

    async def drain(self, timeout: float | None = None) -> int:
        return await self.router.drain(timeout)

    async def scale(self, prefill: int | None = None, decode: int | None = None) -> dict:
        return await self.router.scale(prefill, decode)

    async def status(self) -> dict:
        a = self.router.autoscaler
        return {"url": self.router.url, "healthy": self.router.healthy(), "pools": self.router.status(),
                "autoscale": a.last.reasons if a is not None and a.last is not None else None}

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def worker_handle(self, worker_id: str):
        """A worker's actor handle (operators and tests reach a worker through its router)."""
        return next(w.handle for pool in self.router.pools.values() for w in pool.values()
                    if w.worker_id == worker_id)

    async def worker_stats(self) -> dict[str, WorkerStats]:
        """Every worker's current stats (free KV blocks, running, waiting), fetched now."""
        workers = [w for pool in self.router.pools.values() for w in pool.values()]
        stats = await asyncio.gather(*(w.handle.stats.remote() for w in workers), return_exceptions=True)
        return {w.worker_id: st for w, st in zip(workers, stats, strict=True) if not isinstance(st, BaseException)}

    async def stop(self) -> None:
        await self.router.stop()
