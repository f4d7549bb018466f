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
from pdserve.kv_transfer.protocol import Fingerprint
from pdserve.kv_transfer.reservations import LocalReservation, ReceivedKV, Reservation, ReservationTable, State


@dataclass
class KVPool:
    """A paged KV pool as the transfer layer sees it: tensors, block bookkeeping, the lock
    shared with whoever else allocates from it (the engine loop), and its fingerprint."""

    kv: PagedKVCache
    blocks: BlockManager
    fingerprint: Fingerprint
    lock: threading.RLock = field(default_factory=threading.RLock)

    @classmethod
    def from_engine(cls, engine) -> KVPool:
        src, arch = engine.source, engine.arch
        fp = Fingerprint.of(model_id=src.model_id, weights_sha256=src.weights_sha256, num_layers=arch.num_layers,
                            num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, dtype=engine.dtype,
                            block_size=engine.block_manager.block_size)
        return cls(engine.kv, engine.block_manager, fp, engine.kv_lock)

    @classmethod
    def standalone(cls, fingerprint: Fingerprint, num_blocks: int, device: torch.device | str = "cpu") -> KVPool:
        """A pool with no engine behind it (benchmarks, tests of the transfer layer alone)."""
        fp = fingerprint
        kv = PagedKVCache(fp.num_layers, num_blocks, fp.block_size, fp.num_kv_heads, fp.head_dim, fp.torch_dtype,
                          torch.device(device))
        return cls(kv, BlockManager(num_blocks, fp.block_size), fp)

    @property
    def num_free_blocks(self) -> int:
        with self.lock:
            return self.blocks.num_free_blocks


__all__ = ["KVPool", "LocalReservation", "ReceivedKV", "Reservation", "ReservationTable", "State"]
