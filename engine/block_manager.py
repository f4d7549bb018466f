"""The paged KV cache's bookkeeping: which blocks are free, who holds which.

Pure Python (no torch): the scheduler and the KV-transfer layer reason about
blocks through this class, and the tensors live in `engine.kv_cache`.

Invariants (checked by `check_invariants`, used by the tests):
  * a block is either on the free list with ref count 0, or off it with ref count >= 1;
  * `num_free_blocks + sum(1 for held blocks) == num_blocks`;
  * `allocate`/`grow` are all-or-nothing: on `NoFreeBlocksError` nothing changed.
Ref counts exist so that blocks can be shared (prefix sharing, forked
sequences); `free` drops one reference and recycles a block at zero.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    """The KV pool cannot hold what was asked for. Nothing was allocated."""

    def __init__(self, requested: int, free: int):
        super().__init__(f"KV cache exhausted: {requested} blocks requested, {free} free")
        self.requested = requested
        self.free = free


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks

    # -- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.can_allocate(self.blocks_for(num_tokens) - len(block_table))

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # -- mutations -----------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(num_blocks, len(self._free))
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._ref[b] = 1
        return blocks

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend `block_table` in place so it covers `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(block_table)
        if missing > 0:
            block_table.extend(self.allocate(missing))

    def share(self, blocks: list[int]) -> list[int]:
        """Take another reference to blocks already held (prefix sharing / fork)."""
        for b in blocks:
            if self._ref[b] < 1:
                raise ValueError(f"block {b} is free; only held blocks can be shared")
        for b in blocks:
            self._ref[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the pool."""
        for b in blocks:
            if self._ref[b] < 1:
                raise ValueError(f"double free of KV block {b}")
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, r in enumerate(self._ref):
            assert (r == 0) == (b in free), f"block {b}: ref {r}, on free list: {b in free}"
