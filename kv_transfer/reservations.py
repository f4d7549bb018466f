"""The decode side's half of the ownership rule: reservations in a paged KV pool.

`ReservationTable` is the receiver's state machine (see the package docstring).
It is called from one thread only (the receiver's event loop); the pool's
`lock` is what it shares with the engine thread, held only while blocks are
allocated or freed.

No torch, gRPC or numpy here: the table reaches the pool only through its
attributes (`blocks`, `kv`, `lock`, `fingerprint`, see `pool.KVPool`), so the
state machine can be imported, and tested, without them.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.block_manager import BlockHash, NoFreeBlocksError
from pdserve.kv_transfer.errors import (
    DuplicateRequest,
    MalformedTransfer,
    RequestReleased,
    ReservationRefused,
    ReservationTooLarge,
    UnknownRequest,
)

if TYPE_CHECKING:
    import torch

    from pdserve.kv_transfer.pool import KVPool


class State(enum.Enum):
    RESERVED = "reserved"
    RECEIVING = "receiving"
    COMMITTED = "committed"
    RELEASED = "released"


@dataclass
class ReceivedKV:
    """A committed transfer: the blocks now belong to whoever `on_commit` hands them to."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_tokens: int
    block_table: list[int]


@dataclass
class Reservation:
    request_id: str
    num_tokens: int
    blocks: list[int]
    lease_deadline: float
    reserved_at: float
    state: State = State.RESERVED
    received: list[int] = field(default_factory=list)  # per layer: tokens written so far (in order)
    bytes_received: int = 0
    reserve_seconds: float = 0.0  # the Reserve handler's time, reported with the push's stage timings
    release_reason: str | None = None
    lease_s: float = 0.0  # the lease granted, exactly (`lease_deadline - reserved_at` carries float error)
    num_cached_tokens: int = 0  # leading tokens whose KV the pool's prefix cache supplied: nothing is pushed for them
    # The event after its last write into the pool (`engine.streams.CopyEvent`; writes land in order): the
    # blocks are handed over or freed only once it is done.
    landed: object | None = None
    _slots: torch.Tensor | None = None

    def slots(self, pool: KVPool) -> torch.Tensor:
        if self._slots is None:
            self._slots = pool.kv.slots(self.blocks, 0, self.num_tokens).to(pool.kv.device)
        return self._slots


class ReservationTable:
    """Reserve -> receive -> commit | release, with leases and tombstones.

    Invariants (tests check them through the pool's free-block count):
      * a reservation's blocks come off the free list in `reserve` and go back exactly once:
        in `release` (any non-terminal state) or to the committer in `commit`;
      * nothing is written into the pool for a request that is not RECEIVING, and a write
        is bounds-checked (layer, token range, size) before it touches the pool;
      * `release` is idempotent and answers what state it found.
    """

    def __init__(self, pool: KVPool, *, lease_s: float, tombstone_ttl_s: float = 600.0,
                 max_tombstones: int = 100_000, clock=time.monotonic):
        self.pool = pool
        self.lease_s = lease_s
        self.tombstone_ttl_s = tombstone_ttl_s
        self.max_tombstones = max_tombstones
        self.clock = clock
        self.live: dict[str, Reservation] = {}
        self._tombstones: OrderedDict[str, tuple[float, State, str]] = OrderedDict()

    # -- queries ---------------------------------------------------------------------------
    @property
    def reserved_blocks(self) -> int:
        return sum(len(r.blocks) for r in self.live.values())

    def state_of(self, request_id: str) -> str:
        r = self.live.get(request_id)
        if r is not None:
            return r.state.value
        t = self._tombstones.get(request_id)
        return t[1].value if t else "unknown"

    def next_deadline(self) -> float | None:
        return min((r.lease_deadline for r in self.live.values()), default=None)

    # -- transitions -------------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int, lease_s: float | None = None,
                prefix: Sequence[BlockHash] = ()) -> Reservation:
        """Room for `num_tokens` tokens of KV. `prefix`: the names of its full blocks; the leading ones the
        pool has cached are taken from the cache (a reference each, so they cannot be evicted meanwhile)
        and the push starts after them (`Reservation.num_cached_tokens`)."""
        if not request_id:
            raise MalformedTransfer("empty request id")
        if request_id in self.live:
            raise DuplicateRequest(f"request {request_id!r} already has a reservation")
        self._check_not_released(request_id)
        if num_tokens < 1:
            raise MalformedTransfer(f"cannot reserve for {num_tokens} tokens")
        n = self.pool.blocks.blocks_for(num_tokens)
        if n > self.pool.blocks.num_blocks:
            raise ReservationTooLarge(f"{num_tokens} tokens need {n} blocks; the pool has "
                                     f"{self.pool.blocks.num_blocks} in all")
        bm = self.pool.blocks
        # at least the last token's KV travels, so a push always has a chunk to carry
        prefix = list(prefix)[:(num_tokens - 1) // bm.block_size]
        with self.pool.lock:
            cached = bm.acquire_prefix(prefix)
            try:
                blocks = cached + bm.allocate(n - len(cached))
            except NoFreeBlocksError as e:
                bm.free(cached)
                raise ReservationRefused(str(e)) from None
        now = self.clock()
        lease = self.lease_s if not lease_s else min(lease_s, self.lease_s)
        start = len(cached) * bm.block_size
        r = Reservation(request_id, num_tokens, blocks, now + lease, now,
                        received=[start] * self.pool.fingerprint.num_layers, lease_s=lease, num_cached_tokens=start)
        self.live[request_id] = r
        return r

    def begin(self, request_id: str, num_tokens: int) -> Reservation:
        """A push arrives: RESERVED -> RECEIVING."""
        r = self.live.get(request_id)
        if r is None:
            self._check_not_released(request_id)
            raise UnknownRequest(f"no reservation for request {request_id!r}")
        if r.state is not State.RESERVED:
            raise DuplicateRequest(f"request {request_id!r} is already {r.state.value}")
        if num_tokens != r.num_tokens:
            self.release(request_id, "malformed")
            raise MalformedTransfer(f"push for {num_tokens} tokens, reserved for {r.num_tokens}")
        r.state = State.RECEIVING
        return r

    def check_chunk(self, r: Reservation, layer: int, num_layers: int, token_start: int, num_tokens: int,
                    nbytes: int) -> None:
        """Bounds and order of a chunk (layers [layer, layer + num_layers), tokens [token_start,
        token_start + num_tokens)), before any byte of it is used. Raises MalformedTransfer."""
        if r.state is not State.RECEIVING:
            raise RequestReleased(f"request {r.request_id!r} is {r.state.value} ({r.release_reason})")
        fp = self.pool.fingerprint
        if num_layers < 1 or not 0 <= layer <= layer + num_layers <= fp.num_layers:
            raise MalformedTransfer(f"layers [{layer}, {layer + num_layers}) out of range [0, {fp.num_layers})")
        if num_tokens < 1 or token_start + num_tokens > r.num_tokens:
            raise MalformedTransfer(f"chunk tokens [{token_start}, {token_start + num_tokens}) outside the "
                                    f"{r.num_tokens} reserved")
        for i in range(layer, layer + num_layers):
            if token_start != r.received[i]:
                raise MalformedTransfer(f"layer {i}: chunk starts at token {token_start}, expected "
                                        f"{r.received[i]} (chunks of a layer arrive in order, once)")
        if nbytes != num_layers * num_tokens * fp.bytes_per_token_layer:
            raise MalformedTransfer(f"chunk of {num_layers} layer(s) x {num_tokens} tokens has {nbytes} bytes, "
                                    f"expected {num_layers * num_tokens * fp.bytes_per_token_layer}")

    def write(self, r: Reservation, layer: int, token_start: int, kv: torch.Tensor) -> None:
        """Write a chunk `[num_layers, 2, n, kv_heads, head_dim]` (or one layer's `[2, n, ...]`)
        for layers starting at `layer` into the reserved blocks, after checking it."""
        if kv.dim() == 4:
            kv = kv.unsqueeze(0)
        nl, n = kv.shape[0], kv.shape[2]
        self.check_chunk(r, layer, nl, token_start, n, kv.numel() * kv.element_size())
        r.landed = self.pool.write(r, layer, token_start, kv)
        self.written(r, layer, nl, n, kv.numel() * kv.element_size())

    def written(self, r: Reservation, layer: int, num_layers: int, num_tokens: int, nbytes: int) -> None:
        """Count a checked chunk as landed in `r`'s blocks (by `write`, or by a data plane that writes in place,
        off the loop: `RequestReleased` if the request was released meanwhile)."""
        if r.state is not State.RECEIVING:
            raise RequestReleased(f"request {r.request_id!r} is {r.state.value} ({r.release_reason})")
        for i in range(num_layers):
            r.received[layer + i] += num_tokens
        r.bytes_received += nbytes

    def commit(self, r: Reservation, prompt_token_ids: list[int], output_token_ids: list[int]) -> ReceivedKV:
        """RECEIVING -> COMMITTED once every layer holds every token; the blocks leave the table. The caller
        has waited for `r.landed` (off the loop: see the receiver's Push)."""
        if r.state is not State.RECEIVING:
            raise RequestReleased(f"request {r.request_id!r} is {r.state.value} ({r.release_reason})")
        missing = [i for i, n in enumerate(r.received) if n != r.num_tokens]
        if missing:
            raise MalformedTransfer(f"commit with layers {missing[:8]} incomplete")
        if len(prompt_token_ids) + len(output_token_ids) != r.num_tokens + 1:
            raise MalformedTransfer(f"{len(prompt_token_ids)} prompt + {len(output_token_ids)} output tokens "
                                    f"do not fit KV for {r.num_tokens} tokens plus the newest one")
        r.state = State.COMMITTED
        del self.live[r.request_id]
        self._tombstone(r.request_id, State.COMMITTED, "committed")
        return ReceivedKV(r.request_id, list(prompt_token_ids), list(output_token_ids), r.num_tokens, r.blocks)

    def release(self, request_id: str, reason: str) -> str:
        """Give a request up: its blocks return to the pool. Idempotent; returns the state found."""
        r = self.live.pop(request_id, None)
        if r is None:
            found = self.state_of(request_id)
            if found == "unknown":  # a release that outran its reserve: refuse the reserve when it comes
                self._tombstone(request_id, State.RELEASED, reason)
            return found
        found = r.state.value
        r.state, r.release_reason = State.RELEASED, reason
        if r.landed is not None:  # a write still landing in the blocks must finish before they can be reused
            r.landed.synchronize()
        with self.pool.lock:
            self.pool.blocks.free(r.blocks)
        self._tombstone(request_id, State.RELEASED, reason)
        return found

    def expire(self, now: float | None = None) -> list[str]:
        """Reclaim every reservation whose lease has passed."""
        now = self.clock() if now is None else now
        gone = [rid for rid, r in self.live.items() if r.lease_deadline <= now]
        for rid in gone:
            self.release(rid, "lease_expired")
        cutoff = now - self.tombstone_ttl_s
        while self._tombstones and next(iter(self._tombstones.values()))[0] < cutoff:
            self._tombstones.popitem(last=False)
        return gone

    def release_all(self, reason: str) -> None:
        for rid in list(self.live):
            self.release(rid, reason)

    # -- internals -------------------------------------------------------------------------
    def _check_not_released(self, request_id: str) -> None:
        t = self._tombstones.get(request_id)
        if t is not None:
            raise RequestReleased(f"request {request_id!r} was already {t[1].value} ({t[2]})")

    def _tombstone(self, request_id: str, state: State, reason: str) -> None:
        self._tombstones[request_id] = (self.clock(), state, reason)
        self._tombstones.move_to_end(request_id)
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)


@dataclass(frozen=True)
class LocalReservation:
    """A reservation the decode worker made on its own receiver (`KVReceiver.reserve`): the prefill
    side pushes straight into it, with no Reserve call of its own."""

    request_id: str
    num_blocks: int
    lease_s: float  # the lease granted: the one asked for, capped at the receiver's `lease_s`
    num_cached_tokens: int = 0  # the receiver's prefix cache holds these leading tokens: the push starts after them

    @classmethod
    def of(cls, r: Reservation) -> LocalReservation:
        return cls(r.request_id, len(r.blocks), r.lease_s, r.num_cached_tokens)
