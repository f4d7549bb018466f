"""The router's view of its worker pools, and the routing policy.

Pure bookkeeping (no Ray): a `WorkerState` per worker with what the router has in
flight there and the worker's last reported stats. `RoutingPolicy` is the small
interface: `LeastLoadedPolicy` picks the prefill worker with the fewest queued
prompt tokens and the decode worker with the most free KV blocks among those
below their running limit.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    inflight_tokens: int = 0  # prompt tokens dispatched here and not yet done (prefill queue depth)
    last_ok: float = 0.0  # monotonic time of the last health check it answered

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining


class RoutingPolicy(Protocol):
    def pick_prefill(self, workers: list[WorkerState], num_tokens: int) -> WorkerState | None: ...

    def pick_decode(self, workers: list[WorkerState], num_tokens: int) -> WorkerState | None: ...


def pick_avoiding(pick, workers: list[WorkerState], num_tokens: int, avoid: set[str]) -> WorkerState | None:
    """`pick` among the workers not in `avoid` (those a failed attempt used), else among all."""
    return pick([w for w in workers if w.worker_id not in avoid], num_tokens) or pick(workers, num_tokens)


class LeastLoadedPolicy:
    def pick_prefill(self, workers: list[WorkerState], num_tokens: int) -> WorkerState | None:
        live = [w for w in workers if w.routable]
        return min(live, key=lambda w: (w.inflight_tokens, w.inflight_requests), default=None)

    def pick_decode(self, workers: list[WorkerState], num_tokens: int) -> WorkerState | None:
        live = [w for w in workers if w.routable]
        below = [w for w in live if w.inflight_requests < w.stats.max_num_seqs] or live
        return max(below, key=lambda w: (w.stats.free_blocks, -w.inflight_requests), default=None)
