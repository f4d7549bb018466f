"""A tensor-parallel worker's ranks 1..tp-1 (`engine.parallel`): one Ray actor each, beside the worker actor
(rank 0) in its placement group.

Lifecycle: the pool manager places a worker with `tp` ranks in a STRICT_PACK placement group of `tp` bundles
(`router.workers.WorkerPools._spawn`), the worker in bundle 0. The worker (`TPRanks.start`) hosts the
rendezvous store, starts rank r in bundle r, and joins the process group with them; each rank loads its
shard, then serves rank 0's ops until STOP. The rank actors are the worker's own (not detached): Ray ends
them when the worker's process ends. A rank that dies fails the group (its `serve` call errors, seen by a
watcher thread here, or the next collective fails): the worker then reports itself failing and the pool
manager replaces it, as any failed worker.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from pdserve.engine.parallel import TPGroup, TPRank, tp_store
from pdserve.kv_transfer.ranks import RankChannels

logger = logging.getLogger(__name__)


class TPRankActor:
    """Rank `rank` of a worker's group (a Ray actor): its shard of the model and KV pools."""

    def __init__(self, config, model_path, rank: int, size: int, host: str, port: int):
        if config.serve.worker_nice > 0:  # as the worker itself (ServeConfig.worker_nice)
            os.nice(max(0, min(config.serve.worker_nice, 19 - os.nice(0))))
        if config.engine.num_threads:
            torch.set_num_threads(config.engine.num_threads)
        device = "cuda" if config.model.device == "auto" and torch.cuda.is_available() else config.model.device
        device = "cpu" if device == "auto" else device
        self.tp = TPGroup(rank, size, torch.device(device), host, port, config.parallel.collective_timeout_s)
        self.rank = TPRank(config, model_path, self.tp)
        # the KV plane's per-rank channels: this rank receives its own KV heads from a prefill worker
        RankChannels.register(self.rank, config.kv_transfer)

    def serve(self) -> None:
        self.rank.serve()

    def pid(self) -> int:
        return os.getpid()


class TPRanks:
    """Rank 0's view of its other ranks: their actors and the group."""

    def __init__(self, group: TPGroup, actors: list, served: list):
        self.group, self.actors, self._served = group, actors, served
        self._watcher = threading.Thread(target=self._watch, name="tp-watch", daemon=True)
        self._watcher.start()

    @classmethod
    def start(cls, config, model_path, size: int, device: torch.device) -> TPRanks:
        """Start ranks 1..size-1 and join the group with them (blocks until every rank has joined)."""
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        host = "127.0.0.1"  # the group is packed on one node
        store, port = tp_store(host, config.parallel.collective_timeout_s)
        pg = get_current_placement_group()
        s = config.serve
        gpus = 1 if device.type == "cuda" else 0
        actors = []
        for r in range(1, size):
            opts = {"num_cpus": s.worker_num_cpus, "num_gpus": gpus}
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
            else:  # a worker placed outside a group (not by the pool manager): the ranks go where Ray puts them
                logger.warning("tensor-parallel worker outside a placement group: ranks are not packed")
            actors.append(ray.remote(TPRankActor).options(**opts).remote(config, model_path, r, size, host, port))
        served = [a.serve.remote() for a in actors]  # queued until each rank has loaded its shard
        try:
            group = TPGroup(0, size, device, host, port, config.parallel.collective_timeout_s, store=store)
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        return cls(group, actors, served)

    def _watch(self) -> None:
        """A rank whose `serve` ends before STOP (its actor died) breaks the group."""
        import ray

        pending = list(self._served)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as e:
                self.group.fail(e)
                return

    @property
    def failed(self) -> bool:
        return self.group.error is not None

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
