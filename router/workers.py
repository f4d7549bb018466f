"""The worker pools: their lifecycle and health (no request path here). They live in one place, the
pool manager actor (`router.control`), whatever the number of router replicas reading them.

Workers are detached Ray actors named after the deployment's instance (`pdserve-<instance>-<role>-<n>`),
so a pool manager that Ray restarts finds and adopts them (`adopt`); each knows the actor that started it,
and a pool manager starting up ends the workers of deployments that died for good (`_end_orphans`). A worker joins
routing only once it has loaded its model and answered (`_spawn`). The health loop fails dead, stalled,
silent or failing workers and starts replacements up to each pool's target size (`fail_worker`, `_heal`);
`scale` changes the targets and drains what it removes. A decode worker that leaves is forgotten by every prefill
worker's KV sender (its connection and channel closed). The prefix index (`router.prefix_index`)
follows the pools: a worker that joins starts empty there, one that leaves is dropped, and health
reports reconcile it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from typing import Any

from pdserve.engine.config import PdserveConfig
from pdserve.engine.messages import WorkerInfo, WorkerStats
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pools import WorkerState, worker_status
from pdserve.router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)


class WorkerPools:
    """The prefill and decode pools of one router; runs on the router actor's event loop."""

    def __init__(self, config: PdserveConfig, metrics: RouterMetrics, model_name: str, instance: str):
        self.config = config
        self.serve = config.serve
        self.metrics = metrics
        self.model_name = model_name
        # Worker actor names carry it: unique when several routers share a cluster, and stable across a
        # router restart (the restarted router finds its workers by it).
        self.instance = instance
        self.pools: dict[str, dict[str, WorkerState]] = {"prefill": {}, "decode": {}}
        self.index = PrefixIndex()  # which prefixes each worker is believed to have cached
        self.target = {"prefill": 0, "decode": 0}  # pool sizes self-healing restores
        self.spawning = {"prefill": 0, "decode": 0}
        self._seq = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self.version = 0  # bumped by every change router replicas must see (`touch`)
        self._changed = asyncio.Event()
        # Requests the routers have in flight on a worker (the manager sums its replicas' reports); a drain
        # waits for it to fall to 0, and for every replica to have seen the drain (`drained`).
        self.drained = lambda w, version: not w.inflight_requests
        self.on_failure = lambda role, reason: None  # counts it where the routers read it

    def touch(self) -> None:
        """Something routers must see changed (membership, health, draining, load): wake their watches."""
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self, version: int, timeout: float) -> None:
        """Returns once the pools' version differs from `version`, or after `timeout` seconds."""
        if version == self.version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def start(self, adopt: bool = False) -> None:
        """Adopt a previous incarnation's workers (`adopt`), fill the pools to their configured sizes and
        start the health loop."""
        s = self.serve
        await self._end_orphans()
        if adopt:
            await self._adopt()
        want_prefill = s.prefill_workers if s.mode == "disaggregated" else 0
        await self.scale(prefill=max(want_prefill, self.target["prefill"]),
                         decode=max(s.decode_workers, self.target["decode"]))
        self._tasks.append(asyncio.create_task(self._health_loop()))

    def ready(self) -> bool:
        """Every pool the mode needs has a routable worker."""
        need = ["decode"] + (["prefill"] if self.serve.mode == "disaggregated" else [])
        return all(any(w.routable for w in self.pools[role].values()) for role in need)

    async def stop(self) -> None:
        """Stop healing and end every worker."""
        for t in self._tasks:
            t.cancel()
        self.target = {"prefill": 0, "decode": 0}
        for pool in self.pools.values():
            for w in list(pool.values()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.handle.shutdown.remote(), 10)
                _kill(w.handle, self._name_prefix + w.worker_id)
            pool.clear()

    # -- pools --------------------------------------------------------------------------------------
    def _actor_options(self, role: str) -> dict:
        import ray

        res = ray.cluster_resources()
        gpus = self.serve.worker_num_gpus
        if gpus is None:
            gpus = 1 if res.get("GPU", 0) >= 1 else 0
        opts: dict[str, Any] = {"num_cpus": self.serve.worker_num_cpus, "num_gpus": gpus, "max_concurrency": 1000}
        custom = self.serve.prefill_resource if role == "prefill" else self.serve.decode_resource
        if res.get(custom, 0) > 0:  # the cluster dedicates nodes to this pool
            opts["resources"] = {custom: 0.001}
        return opts

    async def _spawn(self, role: str) -> WorkerState | None:
        """Start one worker; it joins routing only once it has loaded its model and answered."""
        import ray

        from pdserve.decode_worker.worker import DecodeWorker
        from pdserve.prefill_worker.worker import PrefillWorker

        n = next(self._seq)
        worker_id = f"{role}-{n}"
        cls = PrefillWorker if role == "prefill" else DecodeWorker
        self.spawning[role] += 1
        handle = None
        try:
            opts = self._actor_options(role)
            tp = self.config.parallel.tp_for(role)
            if tp > 1:  # rank 0 (this actor) and its tp - 1 rank actors, packed on one node (`worker.tp`)
                opts = await self._tp_placement(self._name_prefix + worker_id, opts, tp)
            # Detached, so that the workers outlive a router that dies: its restart adopts them.
            handle = ray.remote(cls).options(name=self._name_prefix + worker_id, namespace="pdserve",
                                             lifetime="detached", **opts
                                             ).remote(self.config.for_workers(), worker_id, _current_actor())
            # a worker the cluster cannot place (no resources) or that cannot load its model gives up
            info = await asyncio.wait_for(handle.info.remote(), self.serve.worker_start_timeout_s)
            # up and answering: from here a frozen or cut-off worker is given up like a failed health check
            stats = await asyncio.wait_for(handle.stats.remote(), self.serve.health_timeout_s)
        except Exception as e:  # TimeoutError included
            logger.error("could not start %s: %s", worker_id, e)
            _kill(handle, self._name_prefix + worker_id)
            return None
        finally:
            self.spawning[role] -= 1
        state = self._join(role, worker_id, handle, info, stats)  # joins routing only now, ready
        logger.info("%s ready: %s", worker_id, info)
        return state

    async def _tp_placement(self, name: str, opts: dict, tp: int) -> dict:
        """A STRICT_PACK placement group of `tp` worker-sized bundles (detached and named after the worker, like
        it: `_kill` removes it) once it is placed; the options that put the worker in bundle 0."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.placement_group([worker_bundle(opts)] * tp, strategy="STRICT_PACK", name=name + TP_GROUP_SUFFIX,
                                      lifetime="detached")
        await asyncio.wait_for(pg.ready(), self.serve.worker_start_timeout_s)
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        return {**opts, "scheduling_strategy": strategy}

    @property
    def _name_prefix(self) -> str:
        """Worker actor names: this prefix + the worker id (how a restarted router finds them)."""
        return f"pdserve-{self.instance}-"

    def _join(self, role: str, worker_id: str, handle, info: WorkerInfo, stats: WorkerStats) -> WorkerState:
        state = WorkerState(worker_id, role, handle, info=info, stats=stats, healthy=stats.alive,
                            last_ok=time.monotonic())
        self.pools[role][worker_id] = state
        self.index.add_worker(worker_id, info.num_blocks or stats.num_blocks)
        self.touch()
        return state

    async def _adopt(self) -> None:
        """A restarted pool manager takes over the workers its previous incarnation started (they are
        detached and named after this deployment's instance id). What they hold stays: the router
        replicas' streams run straight to the workers and never went through the manager."""
        import ray
        from ray.util import list_named_actors

        prefix = self._name_prefix
        names = [a["name"] for a in list_named_actors(all_namespaces=True)
                 if a.get("namespace") == "pdserve" and a["name"].startswith(prefix)]

        async def adopt(name: str) -> None:
            worker_id = name[len(prefix):]
            role = worker_id.split("-", 1)[0]
            try:
                handle = ray.get_actor(name, namespace="pdserve")
                # each call bounded: a worker frozen (or cut off) at any point of the adoption is not adopted
                # (and is ended) instead of holding the restarted router's start-up forever
                info = await asyncio.wait_for(handle.info.remote(), self.serve.health_timeout_s)
                stats = await asyncio.wait_for(handle.stats.remote(), self.serve.health_timeout_s)
            except Exception as e:
                logger.warning("not adopting %s: %s", name, e)
                with contextlib.suppress(Exception):
                    _kill(ray.get_actor(name, namespace="pdserve"), name)
                return
            self._join(role, worker_id, handle, info, stats)
            logger.info("adopted %s", worker_id)

        await asyncio.gather(*(adopt(n) for n in names))
        highest = max((int(w.split("-")[-1]) for pool in self.pools.values() for w in pool), default=-1)
        self._seq = itertools.count(highest + 1)
        for role, pool in self.pools.items():  # the pool sizes the previous incarnation was scaled to
            self.target[role] = max(self.target[role], len(pool))

    async def _end_orphans(self) -> None:
        """End the workers of routers that are gone. Workers are detached, so those of a router whose process
        and driver died for good (`pdserve serve` killed with SIGKILL: Ray does not restart an actor whose
        owner died) would live on, holding their devices and memory. Each worker knows the router actor that
        started it (`Worker.owner`); one whose router is dead is killed. Workers of a live router, or of one
        being restarted (its calls wait), or that cannot tell, are left alone."""
        import ray
        from ray.util import list_named_actors

        ours = self._name_prefix
        groups: dict[str, list[str]] = {}  # another router's name prefix -> its workers' actor names
        for a in list_named_actors(all_namespaces=True):
            m = _WORKER_NAME.fullmatch(a["name"])
            if a.get("namespace") == "pdserve" and m and not a["name"].startswith(ours):
                groups.setdefault(m.group(1), []).append(a["name"])

        async def router_dead(name: str) -> bool:
            try:
                owner = await asyncio.wait_for(ray.get_actor(name, namespace="pdserve").owner.remote(),
                                               self.serve.health_timeout_s)
                if owner is None:
                    return False
                await asyncio.wait_for(owner.pid.remote(), self.serve.health_timeout_s)
            except ray.exceptions.ActorDiedError:
                return True
            except Exception:  # busy, restarting, a worker of an older pdserve: not ours to judge
                return False
            return False

        async def sweep(names: list[str]) -> None:
            if await router_dead(names[0]):
                logger.warning("ending %d workers whose router is gone: %s", len(names), ", ".join(names))
                for name in names:
                    with contextlib.suppress(Exception):
                        _kill(ray.get_actor(name, namespace="pdserve"), name)

        await asyncio.gather(*(sweep(names) for names in groups.values()))

    async def scale(self, prefill: int | None = None, decode: int | None = None) -> dict:
        """Grow or shrink the pools; removed workers drain (finish what they hold, within
        `drain_timeout_s`; what is left migrates) and exit. The sizes become the targets that
        self-healing restores."""
        jobs = []
        for role, want in (("prefill", prefill), ("decode", decode)):
            if want is None:
                continue
            if role == "decode" and want < 1 or role == "prefill" and want < (
                    1 if self.serve.mode == "disaggregated" else 0):
                raise ValueError(f"cannot scale {role} to {want}")
            self.target[role] = want
            live = self._live(role)
            jobs += [self._spawn(role) for _ in range(want - len(live) - self.spawning[role])]
            for w in live[want:] if want < len(live) else []:
                w.draining = True
                self._tasks.append(asyncio.create_task(self._drain(w, self.version + 1)))
        self.touch()
        await asyncio.gather(*jobs)
        return self.status()

    def _live(self, role: str) -> list[WorkerState]:
        return [w for w in self.pools[role].values() if not w.draining]

    async def _drain(self, w: WorkerState, version: int) -> None:
        """`version`: the pools' version that shows `w` draining (routers that saw it route nothing new there)."""
        deadline = time.monotonic() + self.serve.drain_timeout_s
        while not self.drained(w, version) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._remove(w)
        if w.inflight_requests:  # killed outright: its requests see it die and migrate
            logger.warning("%s: %d requests still running after the drain timeout; migrating them",
                           w.worker_id, w.inflight_requests)
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.handle.shutdown.remote(), 10)
        _kill(w.handle, self._name_prefix + w.worker_id)

    def _remove(self, w: WorkerState) -> None:
        w.healthy = False
        if self.pools[w.role].get(w.worker_id) is w:
            del self.pools[w.role][w.worker_id]
            self.index.drop(w.worker_id)
            self.touch()
        if w.role == "decode" and w.info.kv_address:  # its KV address is dead: senders close what they hold
            for p in list(self.pools["prefill"].values()):
                p.handle.forget_peer.remote(w.info.kv_address)

    def fail_worker(self, w: WorkerState, reason: str) -> None:
        """Take a worker that died, stalled or stopped answering out of the pool, kill it (its
        in-flight requests then fail over to other workers) and start a replacement."""
        if self.pools[w.role].get(w.worker_id) is not w:
            return  # already handled
        logger.error("%s failed (%s): replacing it", w.worker_id, reason)
        self._remove(w)
        self.metrics.worker_failures.labels(self.model_name, w.role, reason).inc()
        self.on_failure(w.role, reason)
        _kill(w.handle, self._name_prefix + w.worker_id)
        self._heal()

    def _heal(self) -> None:
        """Start workers until every pool (live + starting) is back at its target size."""
        for role, want in self.target.items():
            for _ in range(want - len(self._live(role)) - self.spawning[role]):
                self._tasks.append(asyncio.create_task(self._spawn(role)))
        self._tasks = [t for t in self._tasks if not t.done()]

    def status(self) -> dict:
        """Per role, each worker as routing sees it: health, requests in flight, and its KV pool as of its
        last health check (free blocks count evictable cached ones), beside the blocks the prefix index
        believes it has cached."""
        return {role: [worker_status(w, self.index.size(w.worker_id)) for w in pool.values()]
                for role, pool in self.pools.items()}

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.serve.health_interval_s)
            await asyncio.gather(*(self._check(w) for pool in self.pools.values() for w in list(pool.values())))
            self._heal()
            self.touch()  # fresh load figures for the routers

    async def _check(self, w: WorkerState) -> None:
        """A worker is routable while it answers in time and its engine loop lives, makes progress and
        does not keep failing. Dead, stalled (work queued, no progress for `stall_timeout_s`), silent for
        that long, or failing (`max_step_errors` failed steps within `step_error_window_s`): failed."""
        import ray

        s = self.serve
        # the report covers every request routed here if none was in flight or dispatched meanwhile
        quiet, dispatched = not w.inflight_requests, w.num_dispatched
        try:
            w.stats = await asyncio.wait_for(w.handle.stats.remote(), s.health_timeout_s)
        except ray.exceptions.RayActorError:
            return self.fail_worker(w, "died")
        except Exception:
            w.healthy = False
            if time.monotonic() - w.last_ok > s.stall_timeout_s:
                self.fail_worker(w, "unresponsive")
            return
        w.last_ok = time.monotonic()
        if not w.stats.alive:
            return self.fail_worker(w, "engine_loop_died")
        if w.stats.busy and w.stats.progress_age_s > s.stall_timeout_s:
            return self.fail_worker(w, "stalled")
        if w.stats.failing:  # its engine steps keep failing: its emptied KV pool would keep attracting traffic
            return self.fail_worker(w, "step_errors")
        w.healthy = True
        if quiet and not w.inflight_requests and w.num_dispatched == dispatched:
            self.index.reconcile(w.worker_id, w.stats.num_cached_blocks)


_WORKER_NAME = re.compile(r"(pdserve-[0-9a-f]+-)(?:prefill|decode)-\d+")  # detached worker actor names


def _current_actor():
    """This process's actor handle (the router's), or None outside an actor."""
    import ray

    try:
        return ray.get_runtime_context().current_actor
    except Exception:
        return None


def _kill(handle, name: str | None = None) -> None:
    """End a worker actor for good (detached: nothing else would), whatever state it is in, and the placement
    group of a tensor-parallel worker (`name`: the worker's actor name; its ranks end with it)."""
    import ray

    if handle is not None:
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)
    if name is not None:
        with contextlib.suppress(Exception):  # none: a worker without tensor parallelism
            ray.util.remove_placement_group(ray.util.get_placement_group(name + TP_GROUP_SUFFIX))


TP_GROUP_SUFFIX = "-tp"  # a tensor-parallel worker's placement group: its actor name + this


def worker_bundle(options: dict) -> dict[str, float]:
    """The resources a worker with these actor options takes, as a placement bundle."""
    b = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0),
         **{k: float(v) for k, v in (options.get("resources") or {}).items()}}
    return {k: v for k, v in b.items() if v > 0}
