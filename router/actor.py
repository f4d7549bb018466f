"""The router's Ray actor: `launch_router` creates it, `RouterActor` hosts a `Router` (the request
path and the HTTP server) and answers the operator's and the tests' calls (start, drain, scale,
status, a worker's handle, every worker's stats).

Several replicas may serve one deployment (`serve.routers`): each is a `RouterActor` with its own HTTP
port, all reading the pools of one pool manager (`router.control`), which alone scales, drains and heals
them. `launch_router` without a manager starts one for this router alone (and ends it with the router).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
import warnings

from pdserve.engine.config import PdserveConfig
from pdserve.engine.messages import WorkerStats
from pdserve.router.server import Router

logger = logging.getLogger(__name__)
_OWNED_POOLS: list = []  # the pool managers `launch_router` started for its routers alone


def launch_router(config: PdserveConfig, *, name: str | None = None, namespace: str | None = None, pools=None,
                  replica: int = 0, instance: str | None = None, **options):
    """Create a router replica actor (call `start` on it next). `pools`: the deployment's pool manager
    (`router.control.launch_pools`); None starts one that this router owns. Ray restarts the router if its
    process dies; the restarted router serves again on the same address, over the same pools."""
    import ray

    from pdserve.router.control import launch_pools

    instance = instance or uuid.uuid4().hex[:6]
    owns = pools is None
    if owns:
        pools = launch_pools(config, instance)
        # Held here as long as the caller's process lives (as the router is): an actor whose only handle is
        # in the router's arguments would end, unreferenced, while Ray restarts the router.
        _OWNED_POOLS.append(pools)
    opts = {"num_cpus": 0, "max_concurrency": 10_000, "max_restarts": -1, "max_task_retries": 3, **options}
    if name:
        opts.update(name=name, namespace=namespace)
    # the SLA planner (`autoscale`) runs in replica 0 alone: its decisions happen once, in the pool manager
    return ray.remote(RouterActor).options(**opts).remote(config, f"{instance}-r{replica}", pools, owns,
                                                          planner=replica == 0)


def launch_deployment(config: PdserveConfig, *, names: tuple[str, str] | None = None, namespace: str | None = None,
                      here: str | None = None) -> tuple:
    """The pool manager and the router replicas over it (`serve.routers` of them on node `here`, ports
    `port + i`; or, on a cluster defining `serve.router_resource`, one on each node carrying it, each on
    `port`). `names`: the manager's name and the replicas' name stem (replica i > 0 gets `-i`). Returns
    (manager, [replicas]); call `start` on every replica next."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pdserve.router.control import launch_pools

    s = config.serve
    instance = uuid.uuid4().hex[:6]
    pools = launch_pools(config, instance, name=names and names[0], namespace=namespace)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get(s.router_resource, 0) > 0]
    if nodes:  # one replica per node that carries the router resource, each on the same port
        placed = [(node, s.port) for node in nodes]
    else:
        placed = [(here, s.port + i if s.port else 0) for i in range(s.routers)]
    routers = []
    for i, (node, port) in enumerate(placed):
        opts = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)} if node else {}
        if nodes:  # a sliver of the node's router resource: in use, so an autoscaler never takes it for idle
            opts["resources"] = {s.router_resource: 0.001}
        name = names and (names[1] if i == 0 else f"{names[1]}-{i}")
        routers.append(launch_router(config.replace(serve={"port": port}), name=name, namespace=namespace,
                                     pools=pools, replica=i, instance=instance, **opts))
    return pools, routers


class RouterActor:
    """The Ray actor (`launch_router`) that hosts `Router` and its HTTP server."""

    def __init__(self, config: PdserveConfig, replica: str, pools, owns_pools: bool = False, planner: bool = True):
        import ray

        logging.basicConfig(level=logging.INFO)
        self.pools = pools
        self.owns_pools = owns_pools
        self.router = Router(config, pools, replica, planner=planner)
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60 reads it through a deprecated state API; still supported
            warnings.simplefilter("ignore")
            self.restarted = ctx.was_current_actor_reconstructed
        if self.restarted:  # Ray brought this actor back after its process died: serve again unasked
            logger.warning("router %s restarted: serving again over the same pools", replica)
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
                "replica": self.router.replica,
                "autoscale": a.last.reasons if a is not None and a.last is not None else None,
                # the planner's last input (every replica's load summed), in the replica that plans
                "autoscale_signals": dataclasses.asdict(a.last_signals) if a is not None and a.last_signals
                else None}

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def pools_pid(self) -> int:
        """The pool manager's process (`bench router` reads its CPU use)."""
        return await self.pools.pid.remote()

    async def worker_handle(self, worker_id: str):
        """A worker's actor handle (operators and tests reach a worker through its router)."""
        return next(w.handle for pool in self.router.pools.values() for w in pool.values()
                    if w.worker_id == worker_id)

    async def worker_stats(self) -> dict[str, WorkerStats]:
        """Every worker's current stats (free KV blocks, running, waiting), fetched now; a worker that does
        not answer within `serve.health_timeout_s` (dead, frozen, cut off) is left out."""
        workers = [w for pool in self.router.pools.values() for w in pool.values()]
        timeout = self.router.serve.health_timeout_s
        stats = await asyncio.gather(*(asyncio.wait_for(w.handle.stats.remote(), timeout) for w in workers),
                                     return_exceptions=True)
        return {w.worker_id: st for w, st in zip(workers, stats, strict=True) if not isinstance(st, BaseException)}

    async def stop(self) -> None:
        """Stop serving; a router that owns its pool manager ends it too (and with it every worker)."""
        await self.router.stop()
        if self.owns_pools:
            import ray

            await self.pools.stop.remote()
            ray.kill(self.pools, no_restart=True)
