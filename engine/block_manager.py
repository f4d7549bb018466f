"""The paged KV cache's bookkeeping: which blocks are free, who holds which, and which hold
a known prefix (automatic prefix caching).

Pure Python (no torch): the scheduler and the KV-transfer layer reason about
blocks through this class, and the tensors live in `engine.kv_cache`.

Prefix caching. A full block is named by a hash chained over its tokens and its
predecessor's hash (`block_hashes`), so equal names mean equal prefixes and equal
KV. Once a block's KV is computed, its holder registers the name (`register`).
A named block outlives its requests: when its last reference goes, it becomes
*evictable* (still cached, reusable by a later request with the same prefix
through `acquire_prefix`) rather than free, and it is only recycled, least
recently used first, when `allocate` finds no plain free block left. A shared
block is full and lies before every holder's first uncomputed token, so nobody
writes into it.

Invariants (checked by `check_invariants`, used by the tests):
  * a block is in exactly one state: free (ref 0, no name), evictable (ref 0, named,
    in LRU order) or held (ref >= 1, named or not);
  * names and blocks map one to one (`cached[name] == block` iff `name_of[block] == name`);
  * `num_free_blocks` counts free and evictable blocks: what `allocate` can hand out;
  * `allocate`/`grow`/`acquire_prefix` are all-or-nothing.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

BlockHash = bytes

# The root of every hash chain. A different root (e.g. per model revision, adapter, or a tenant's cache
# salt) keeps prefixes from matching across whatever changes the KV.
ROOT_HASH: BlockHash = b"pdserve-kv-v1"


def hash_block(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """The name of a full block: a 128-bit BLAKE2b over its predecessor's name and its token ids.
    Deterministic across processes (the router computes the same names the workers do)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, *, start: list[BlockHash] | None = None,
                 root: BlockHash = ROOT_HASH) -> list[BlockHash]:
    """Names of the full blocks of `token_ids`. `start`: names already known for its first blocks
    (extended in place and returned), so a growing sequence hashes each block once."""
    out = start if start is not None else []
    parent = out[-1] if out else root
    for b in range(len(out), len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[b * block_size:(b + 1) * block_size])
        out.append(parent)
    return out


class NoFreeBlocksError(RuntimeError):
    """The KV pool cannot hold what was asked for. Nothing was allocated."""

    def __init__(self, requested: int, free: int):
        super().__init__(f"KV cache exhausted: {requested} blocks requested, {free} free")
        self.requested = requested
        self.free = free


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self._name: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 and named; least recently used first
        self.num_evictions = 0

    # -- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out: free, or cached and held by no one (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a named prefix, held or evictable."""
        return len(self._cached)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests, 0..1 (evictable cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.can_allocate(self.blocks_for(num_tokens) - len(block_table))

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def name_of(self, block: int) -> BlockHash | None:
        return self._name[block]

    def num_cached_prefix(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of a prefix with these names are cached here (no change)."""
        n = 0
        for h in hashes:
            if h not in self._cached:
                break
            n += 1
        return n

    # -- mutations -----------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh blocks (ref 1, unnamed): free ones first, then the least recently used evictable ones."""
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(num_blocks, self.num_free_blocks)
        blocks = []
        for _ in range(num_blocks):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._name[b]]
                self._name[b] = None
                self.num_evictions += 1
            self._ref[b] = 1
            blocks.append(b)
        return blocks

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend `block_table` in place so it covers `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(block_table)
        if missing > 0:
            block_table.extend(self.allocate(missing))

    def acquire_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Take a reference on the cached blocks of the longest cached prefix of `hashes` and return them
        (empty when caching is off or nothing matches). They become held: no longer evictable."""
        if not self.enable_caching:
            return []
        blocks = [self._cached[h] for h in hashes[:self.num_cached_prefix(hashes)]]
        for b in blocks:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        return blocks

    def register(self, block: int, name: BlockHash) -> bool:
        """Name a held block whose KV now holds the prefix `name`, so later requests can reuse it. False
        (nothing changes) when caching is off, the block is already named, or another block holds that
        prefix already (two requests computed it at once: the second copy stays private and is freed)."""
        if self._ref[block] < 1:
            raise ValueError(f"block {block} is free; only held blocks can be registered")
        if not self.enable_caching or self._name[block] is not None or name in self._cached:
            return False
        self._name[block] = name
        self._cached[name] = block
        return True

    def share(self, blocks: list[int]) -> list[int]:
        """Take another reference to blocks already held (forked sequences)."""
        for b in blocks:
            if self._ref[b] < 1:
                raise ValueError(f"block {b} is free; only held blocks can be shared")
        for b in blocks:
            self._ref[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A block reaching zero returns to the pool: named ones as
        evictable (the last block of a table is evicted first: later blocks are shared less often)."""
        for b in blocks:
            if self._ref[b] < 1:
                raise ValueError(f"double free of KV block {b}")
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._name[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block (they become plain free blocks); held blocks keep their
        names. Returns how many were dropped."""
        n = len(self._evictable)
        for b in self._evictable:
            del self._cached[self._name[b]]
            self._name[b] = None
            self._free.append(b)
        self._evictable.clear()
        return n

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & self._evictable.keys(), "a block is both free and evictable"
        for b, r in enumerate(self._ref):
            assert r >= 0, f"block {b}: negative ref count {r}"
            if b in free:
                assert r == 0 and self._name[b] is None, f"free block {b}: ref {r}, name {self._name[b]!r}"
            elif b in self._evictable:
                assert r == 0 and self._name[b] is not None, f"evictable block {b}: ref {r}, unnamed"
            else:
                assert r >= 1, f"block {b} is neither free, evictable nor held"
            name = self._name[b]
            if name is not None:
                assert self._cached.get(name) == b, f"block {b}'s name maps to {self._cached.get(name)}"
        assert len(self._cached) == sum(n is not None for n in self._name), "a name maps to a block without it"
        if not self.enable_caching:
            assert not self._cached, "caching is off, yet blocks are named"
