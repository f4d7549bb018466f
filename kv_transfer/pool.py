"""A paged KV pool as the transfer layer sees it (`KVPool`).

The reservations made in it (`ReservationTable` and its records) live in
`reservations`, which needs no torch; they are re-exported here, where they
always were.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.streams import CopyEvent, TransferStream, transfer_stream
from pdserve.kv_transfer.protocol import Fingerprint, KVLayout
from pdserve.kv_transfer.reservations import LocalReservation, ReceivedKV, Reservation, ReservationTable, State


@dataclass
class KVPool:
    """A paged KV pool as the transfer layer sees it: tensors, block bookkeeping, the lock
    shared with whoever else allocates from it (the engine loop), its fingerprint, and how its worker's
    tensor-parallel ranks hold the KV heads (`layout`; one rank holding them all by default)."""

    kv: PagedKVCache
    blocks: BlockManager
    fingerprint: Fingerprint
    lock: threading.RLock = field(default_factory=threading.RLock)
    transfer: TransferStream | None = None  # where received KV is copied in (the device's `transfer_stream`)
    layout: KVLayout | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = KVLayout.whole(self.fingerprint.num_kv_heads)
        if self.transfer is None:
            self.transfer = transfer_stream(self.kv.device)

    def write(self, r: Reservation, layer: int, token_start: int, kv: torch.Tensor) -> CopyEvent:
        """Write a checked chunk `[num_layers, 2, n, kv_heads, head_dim]` (on the host or the device) for
        layers from `layer` into `r`'s blocks from token `token_start`, on the transfer stream; the chunk may
        be dropped when this returns. The event says when it has landed (DONE on CPU): until then the blocks
        are neither handed over nor freed (`ReservationTable`)."""
        xfer = self.transfer
        with xfer.use():
            slots = r.slots(self)[token_start:token_start + kv.shape[2]]
            kv = xfer.to_device(kv)
            for i in range(kv.shape[0]):
                self.kv.write_layer(layer + i, slots, kv[i])
            return xfer.record()

    @classmethod
    def from_engine(cls, engine) -> KVPool:
        src, arch = engine.source, engine.arch
        fp = Fingerprint.of(model_id=src.model_id, weights_sha256=src.weights_sha256, num_layers=arch.num_layers,
                            num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, dtype=engine.dtype,
                            block_size=engine.block_manager.block_size)
        return cls(engine.kv, engine.block_manager, fp, engine.kv_lock, layout=engine_layout(engine))

    @classmethod
    def standalone(cls, fingerprint: Fingerprint, num_blocks: int, device: torch.device | str = "cpu",
                   layout: KVLayout | None = None) -> KVPool:
        """A pool with no engine behind it (benchmarks, tests of the transfer layer alone)."""
        fp = fingerprint
        kv = PagedKVCache(fp.num_layers, num_blocks, fp.block_size, fp.num_kv_heads, fp.head_dim, fp.torch_dtype,
                          torch.device(device))
        return cls(kv, BlockManager(num_blocks, fp.block_size), fp, layout=layout)

    @property
    def num_free_blocks(self) -> int:
        with self.lock:
            return self.blocks.num_free_blocks


def engine_layout(engine) -> KVLayout:
    """How `engine`'s tensor-parallel ranks hold the KV heads (`engine.parallel.Shard`, rank by rank)."""
    if engine.tp is None:
        return KVLayout.whole(engine.arch.num_kv_heads)
    from pdserve.engine.parallel import Shard

    size = engine.tp.size
    return KVLayout(size, tuple(Shard.of(engine.arch, r, size).kv_heads for r in range(size)))


__all__ = ["KVPool", "engine_layout", "LocalReservation", "ReceivedKV", "Reservation", "ReservationTable", "State"]
