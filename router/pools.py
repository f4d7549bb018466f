"""The router's view of its worker pools, the routing policy and the disaggregation decision.

Pure bookkeeping (no Ray): a `WorkerState` per worker with what the router has in
flight there and the worker's last reported stats. `RoutingPolicy` is the small
interface; it sees one attempt as a `Route` (its KV tokens and, per worker, the
leading blocks `router.prefix_index` believes that worker has cached) and answers
a `Choice` (the worker, and why).

  * `LeastLoadedPolicy`: the prefill worker with the fewest queued prompt tokens; the
    decode worker with the most free KV blocks among those below their running limit.
  * `KVAwarePolicy` (the router's default): the same loads, with a cached prefix counted
    as work that need not be done. Prefill: fewest tokens to compute, its queue plus this
    prompt's uncached part. Decode: fewest blocks to fill (the request's blocks less the
    cached prefix) less the free blocks it has. With no prefix cached anywhere it picks
    exactly what `LeastLoadedPolicy` picks.

`place_prefill` decides, per attempt in disaggregated mode, whether the prefill runs on
a prefill worker (remote: the KV travels) or on the decode worker itself (local), by
`serve.disaggregation` and, for "auto", the workers' measured step costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdserve.engine.messages import WorkerInfo, WorkerStats


@dataclass
class WorkerState:
    worker_id: str
    role: str
    handle: Any
    info: WorkerInfo
    stats: WorkerStats
    healthy: bool = False  # answered its last health check with a live engine loop
    draining: bool = False  # being scaled away: no new requests
    inflight_requests: int = 0
    inflight_tokens: int = 0  # prompt tokens to compute dispatched here and not yet done (prefill queue depth)
    # a decode worker's own prefill queue (disaggregated mode, local placements): prompt tokens it computes
    # itself, dispatched and not yet done
    local_prefill_tokens: int = 0
    num_dispatched: int = 0  # attempts ever dispatched here (a health report is current if none came since)
    last_ok: float = 0.0  # monotonic time of the last health check it answered

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining


@dataclass(frozen=True)
class Route:
    """What routing knows of one attempt: its KV tokens (prompt + tokens already streamed) and, per
    worker id, how many of their leading full blocks that worker is believed to hold cached."""

    num_tokens: int
    block_size: int = 16
    overlap: Mapping[str, int] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)

    def cached_blocks(self, w: WorkerState) -> int:
        """Blocks the worker would take from its cache: never the one holding the last token, which the
        engine computes whatever it has cached (the next token's logits come from it)."""
        return min(self.overlap.get(w.worker_id, 0), (self.num_tokens - 1) // self.block_size)

    def uncached_tokens(self, w: WorkerState) -> int:
        """Tokens the worker would have to compute."""
        return self.num_tokens - self.cached_blocks(w) * self.block_size


@dataclass(frozen=True)
class Choice:
    worker: WorkerState
    reason: str  # "prefix_overlap": a cached prefix moved the pick off the least loaded worker; else "least_loaded"


class RoutingPolicy(Protocol):
    def pick_prefill(self, workers: list[WorkerState], route: Route) -> Choice | None: ...

    def pick_decode(self, workers: list[WorkerState], route: Route) -> Choice | None: ...


def pick_avoiding(pick, workers: list[WorkerState], route: Route, avoid: set[str]) -> Choice | None:
    """`pick` among the workers not in `avoid` (those a failed attempt used), else among all."""
    return pick([w for w in workers if w.worker_id not in avoid], route) or pick(workers, route)


def _prefill_load(w: WorkerState) -> tuple:
    return w.inflight_tokens, w.inflight_requests


def _decode_load(w: WorkerState) -> tuple:
    return -w.stats.free_blocks, w.inflight_requests


def _decode_candidates(workers: list[WorkerState]) -> list[WorkerState]:
    live = [w for w in workers if w.routable]
    return [w for w in live if w.inflight_requests < w.stats.max_num_seqs] or live


class LeastLoadedPolicy:
    def pick_prefill(self, workers: list[WorkerState], route: Route) -> Choice | None:
        return _least([w for w in workers if w.routable], _prefill_load)

    def pick_decode(self, workers: list[WorkerState], route: Route) -> Choice | None:
        return _least(_decode_candidates(workers), _decode_load)


class KVAwarePolicy:
    """Least work, a cached prefix counted as work done (see the module docstring). Costs are ordered
    tuples: the first field weighs the request against the load, the rest break ties like
    `LeastLoadedPolicy`."""

    def pick_prefill(self, workers: list[WorkerState], route: Route) -> Choice | None:
        live = [w for w in workers if w.routable]
        return _cheapest(live, route, _prefill_load,
                         lambda w: (route.uncached_tokens(w) + w.inflight_tokens, w.inflight_requests))

    def pick_decode(self, workers: list[WorkerState], route: Route) -> Choice | None:
        need = route.num_blocks
        return _cheapest(_decode_candidates(workers), route, _decode_load,
                         lambda w: (need - route.cached_blocks(w) - w.stats.free_blocks, w.inflight_requests))


def _least(workers: list[WorkerState], load: Callable[[WorkerState], tuple]) -> Choice | None:
    best = min(workers, key=load, default=None)
    return None if best is None else Choice(best, "least_loaded")


def _cheapest(workers: list[WorkerState], route: Route, load: Callable[[WorkerState], tuple],
              cost: Callable[[WorkerState], tuple]) -> Choice | None:
    best = min(workers, key=cost, default=None)
    if best is None:
        return None
    moved = route.cached_blocks(best) > 0 and best is not min(workers, key=load)
    return Choice(best, "prefix_overlap" if moved else "least_loaded")


@dataclass(frozen=True)
class Placement:
    """Where an attempt's prefill runs in disaggregated mode, and why."""

    local: bool  # on the decode worker (it prefills itself, as colocated); else on a prefill worker
    reason: str

    @property
    def path(self) -> str:
        return "local" if self.local else "remote"


def shares_cores(a: WorkerState, b: WorkerState) -> bool:
    """Whether the two workers lend each other one machine's cores (`serve.share_idle_cores`): then work
    moved from one to the other runs on the same cores, and adds no compute."""
    return a.info.core_board is not None and (a.info.node_id, a.info.core_board) == (b.info.node_id,
                                                                                      b.info.core_board)


def place_prefill(mode: str, decode: WorkerState, prefill: WorkerState | None, uncached: int,
                  block_size: int, step_tokens: int) -> Placement:
    """`serve.disaggregation` for one attempt, once its decode worker is picked. `uncached`: the tokens
    the decode worker would compute itself (its cached prefix left out). `prefill`: the prefill worker
    a remote prefill would use (None: none is routable). `step_tokens`: a step's token budget
    (`scheduler.max_num_batched_tokens`).

    "never": local. "always": remote. "auto", in this order:
      1. local when no prefill worker is routable (no_prefill_worker), or the decode worker has
         nothing in flight, so a local prefill delays no stream (idle_decode);
      2. local when the prefill worker shares the decode worker's cores (CPU workers on one machine
         with `serve.share_idle_cores`) and the uncached tokens fit one step's budget (shared_cores).
         Those two lend each other their cores: while the prefill worker is busy the decode worker
         steps on its own share, so a remote prefill moves the work onto the same cores and adds none.
         Locally it joins the decode worker's one queue (shortest first) on every core, and stalls
         the streams there for at most one step, as in colocated mode (on two cores it halves a
         chat burst's TTFT p50: docs/benchmarks.md). A longer prompt would hold several of the
         decode worker's steps: the rules below decide it;
      3. with no measured costs yet (a fresh decode worker reports 0): local only for at most one
         block of uncached tokens, the stall a single decode step's worth of work costs (unmeasured);
      4. local when the decode worker's own prefill of the uncached tokens (its measured seconds per
         prompt token) takes at most one of its decode steps at its current batch size: the streams
         it runs lose at most about one extra inter-token gap (short_prompt);
      5. local when the prefill pool is the bottleneck: the chosen prefill worker's queued tokens,
         at its measured seconds per token, take longer than the local prefill, counted behind the local
         prefills this decode worker already has queued (prefill_busy): a burst is shared between the
         two queues instead of piling onto whichever looked shorter when it was empty;
      6. otherwise remote: the local prefill would stall the running streams for longer than a
         step, and the prefill worker can start on it sooner (long_prompt)."""
    if mode == "never":
        return Placement(True, "configured")
    if mode == "always":
        return Placement(False, "configured")
    if prefill is None:
        return Placement(True, "no_prefill_worker")
    if decode.inflight_requests == 0:
        return Placement(True, "idle_decode")
    if uncached <= step_tokens and shares_cores(decode, prefill):
        return Placement(True, "shared_cores")
    d = decode.stats
    if not (d.prefill_s_per_token > 0 and d.decode_step_s > 0):
        return Placement(uncached <= block_size, "unmeasured")
    local_s = uncached * d.prefill_s_per_token
    if local_s <= d.decode_step_s:
        return Placement(True, "short_prompt")
    queue_s = prefill.inflight_tokens * (prefill.stats.prefill_s_per_token or d.prefill_s_per_token)
    if queue_s > local_s + decode.local_prefill_tokens * d.prefill_s_per_token:
        return Placement(True, "prefill_busy")
    return Placement(False, "long_prompt")


def worker_status(w: WorkerState, indexed_blocks: int) -> dict:
    """One worker as routing sees it (`status` of the pools and of a replica's mirror): health, requests
    in flight, its KV pool as of its last report, and the blocks the prefix index believes it has cached."""
    return {"worker_id": w.worker_id, "healthy": w.healthy, "draining": w.draining,
            "inflight": w.inflight_requests, "node_id": w.info.node_id, "dtype": w.info.dtype,
            "attention": w.info.attention, "free_blocks": w.stats.free_blocks, "num_blocks": w.stats.num_blocks,
            "cached_blocks": w.stats.num_cached_blocks, "indexed_blocks": indexed_blocks}
