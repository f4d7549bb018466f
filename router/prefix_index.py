"""The router's guess of which KV blocks each worker's prefix cache holds (pure bookkeeping, no Ray).

Per worker an LRU set of block names (`engine.block_manager.block_hashes`: deterministic across
processes, so the router names blocks exactly as the workers do), bounded by the worker's pool
size. `overlap(worker, names)` counts the leading names it is believed to hold: the prefix of
a request that worker would not compute again. Kept in step by the router (`Router._attempt`):

  * routing a request inserts the names of its KV (prompt + tokens already streamed) on the
    prefill worker that prefills it and on the decode worker that receives (or computes) it;
  * a request that finishes inserts on its decode worker the names of every full block of its
    prompt and output except the last token's (decode workers cache what they decode; the last
    sampled token's KV is never computed);
  * a worker that joins a pool starts empty (`add_worker`: a new or restarted worker holds
    nothing, an adopted one holds what the old router routed there, which this one never saw);
    one that leaves (died, failed, drained, scaled away) is dropped (`drop`);
  * health checks reconcile (`reconcile`): a worker that reports no cached block at all (restarted
    in place, cache reset) is cleared; one that reports fewer than the index holds is trimmed to
    that many, least recently used first (it evicted; so does its own LRU).

Why a router-side index instead of workers publishing their cache events (as vLLM's KV events
do): it needs no extra channel, no ordering between event streams and requests, and nothing on
the workers' hot path; and a wrong guess is cheap and safe. The worker matches a request against
its real cache, so a stale entry costs a cache miss (a prefix computed again), never a wrong
token. The same holds the other way: a prefix the index missed is still found by the worker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from pdserve.engine.block_manager import BlockHash


class PrefixIndex:
    """Per worker, the block names its prefix cache is believed to hold, least recently used first."""

    def __init__(self) -> None:
        self._held: dict[str, OrderedDict[BlockHash, None]] = {}
        self._capacity: dict[str, int] = {}

    def add_worker(self, worker_id: str, capacity: int) -> None:
        """A worker joins (or joins again): it starts empty and holds at most `capacity` names."""
        self._held[worker_id] = OrderedDict()
        self._capacity[worker_id] = max(0, capacity)

    def drop(self, worker_id: str) -> None:
        """A worker left its pool: forget it (inserting for it afterwards does nothing)."""
        self._held.pop(worker_id, None)
        self._capacity.pop(worker_id, None)

    def workers(self) -> list[str]:
        return list(self._held)

    def size(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def insert(self, worker_id: str, names: Sequence[BlockHash]) -> None:
        """The worker now holds these names (a prefix, in order). They become the most recently used,
        the first one most of all: like the worker's own cache, which frees a request's blocks last
        first, a prefix's tail is evicted before its head (a tail without its head is of no use)."""
        held = self._held.get(worker_id)
        if held is None:
            return
        for name in reversed(names):
            held[name] = None
            held.move_to_end(name)
        self._trim(worker_id, self._capacity[worker_id])

    def overlap(self, worker_id: str, names: Iterable[BlockHash]) -> int:
        """How many leading names of a prefix the worker is believed to hold (no change)."""
        held = self._held.get(worker_id)
        if not held:
            return 0
        n = 0
        for name in names:
            if name not in held:
                break
            n += 1
        return n

    def reconcile(self, worker_id: str, num_cached_blocks: int) -> None:
        """Bring a worker's entry in line with the number of named blocks it reports holding. Call it
        only with a report taken after every request routed there so far had finished (else the
        report may predate blocks the index already, rightly, lists)."""
        if worker_id not in self._held:
            return
        self._trim(worker_id, num_cached_blocks)

    def _trim(self, worker_id: str, bound: int) -> None:
        held = self._held[worker_id]
        if bound <= 0:
            held.clear()
            return
        while len(held) > bound:
            held.popitem(last=False)
