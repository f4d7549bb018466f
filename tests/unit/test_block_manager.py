import contextlib
import random

import pytest

from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError


def test_allocate_grow_free_roundtrip():
    bm = BlockManager(num_blocks=10, block_size=4)
    table: list[int] = []
    bm.grow(table, 9)  # 9 tokens -> 3 blocks
    assert len(table) == 3 and bm.num_free_blocks == 7
    bm.grow(table, 12)  # still fits in 3 blocks
    assert len(table) == 3
    bm.grow(table, 13)
    assert len(table) == 4 and len(set(table)) == 4
    bm.free(table)
    assert bm.num_free_blocks == 10
    bm.check_invariants()


def test_exhaustion_is_typed_and_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=16)
    held = bm.allocate(3)
    table = [held[0]]
    with pytest.raises(NoFreeBlocksError) as err:
        bm.grow(table, 16 * 3)  # needs 2 more, 1 free
    assert err.value.requested == 2 and err.value.free == 1
    assert table == [held[0]] and bm.num_free_blocks == 1
    assert not bm.can_grow(table, 48) and bm.can_grow(table, 32)
    bm.free(held)
    assert bm.num_free_blocks == 4


def test_refcounts_share_and_double_free():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = bm.allocate(2)
    b = bm.share(a)
    assert [bm.ref_count(x) for x in a] == [2, 2]
    bm.free(a)
    assert bm.num_free_blocks == 1  # still referenced by b
    bm.free(b)
    assert bm.num_free_blocks == 3
    with pytest.raises(ValueError, match="double free"):
        bm.free(b)
    with pytest.raises(ValueError, match="free"):
        bm.share([0])


def test_randomised_operations_keep_invariants():
    rng = random.Random(7)
    bm = BlockManager(num_blocks=64, block_size=rng.choice([1, 4, 16]))
    tables: list[list[int]] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.5:
            table: list[int] = tables[rng.randrange(len(tables))] if tables and rng.random() < 0.5 else []
            with contextlib.suppress(NoFreeBlocksError):
                bm.grow(table, len(table) * bm.block_size + rng.randint(1, 40))
            if table and table not in tables:
                tables.append(table)
        elif op < 0.6 and tables:
            tables.append(bm.share(tables[rng.randrange(len(tables))]))
        elif tables:
            bm.free(tables.pop(rng.randrange(len(tables))))
        bm.check_invariants()
        assert bm.num_free_blocks + len({b for t in tables for b in t}) == bm.num_blocks
    for t in tables:
        bm.free(t)
    assert bm.num_free_blocks == bm.num_blocks


# -- prefix caching -------------------------------------------------------------------------------------
from pdserve.engine.block_manager import block_hashes  # noqa: E402


def test_block_hashes_chain_over_the_prefix():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # full blocks only
    b = block_hashes(list(range(32)) + [99] * 8, 16)
    assert a == b  # the partial tail does not matter
    c = block_hashes([7] + list(range(1, 40)), 16)
    assert c[0] != a[0] and c[1] != a[1]  # a change in block 0 renames every later block
    d = block_hashes(list(range(16)) + [5] * 16, 16)
    assert d[0] == a[0] and d[1] != a[1]
    grown = block_hashes(list(range(16)), 16)
    assert block_hashes(list(range(40)), 16, start=grown) == a and grown == a  # extended in place


def test_freed_named_blocks_stay_cached_until_the_pool_needs_them():
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    names = block_hashes([1, 2, 3, 4, 5], 2)
    table = bm.allocate(3)
    assert [bm.register(b, h) for b, h in zip(table, names, strict=False)] == [True, True]
    bm.free(table)
    assert bm.num_free_blocks == 4 and bm.num_evictable_blocks == 2 and bm.num_cached_blocks == 2
    assert bm.num_cached_prefix(names) == 2
    hit = bm.acquire_prefix(names + [b"unknown"])
    assert hit == table[:2] and bm.num_free_blocks == 2 and bm.num_evictable_blocks == 0
    bm.free(hit)
    # plain free blocks go first; then the least recently used cached block, the tail of a table first
    fresh = bm.allocate(2)
    assert set(fresh).isdisjoint(hit) and bm.num_cached_blocks == 2
    more = bm.allocate(1)
    assert more == [hit[1]] and bm.num_cached_prefix(names) == 1 and bm.num_evictions == 1
    assert bm.name_of(hit[1]) is None
    bm.check_invariants()


def test_a_prefix_computed_twice_keeps_one_cached_copy():
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    name = block_hashes([1, 2], 2)[0]
    a, b = bm.allocate(1), bm.allocate(1)
    assert bm.register(a[0], name) and not bm.register(b[0], name)
    bm.free(a + b)
    assert bm.num_cached_blocks == 1 and bm.num_evictable_blocks == 1
    assert bm.acquire_prefix([name]) == a
    with pytest.raises(ValueError, match="registered"):
        bm.register(b[0], name)  # free blocks cannot be named
    bm.check_invariants()


def test_caching_off_names_nothing():
    bm = BlockManager(num_blocks=2, block_size=2)
    name = block_hashes([1, 2], 2)[0]
    t = bm.allocate(1)
    assert not bm.register(t[0], name) and bm.acquire_prefix([name]) == []
    bm.free(t)
    assert bm.num_evictable_blocks == 0
    bm.check_invariants()


def test_randomized_pool_keeps_ref_counts_and_the_free_or_evictable_count():
    """Allocate, share, register, acquire cached prefixes, swap out and in (a second pool), free, in random
    order, against a model of who holds what: ref counts and "free or evictable" after every operation."""
    rng = random.Random(5)
    bs, n = 4, 24
    bm = BlockManager(n, bs, enable_caching=True)
    cpu = BlockManager(8, bs)
    vocab = [list(rng.choices(range(3), k=8 * bs)) for _ in range(4)]  # few distinct prefixes: many hits
    tables: list[tuple[list[int], list[bytes]]] = []  # (device blocks, names of the tokens they hold)
    swapped: list[tuple[list[int], list[bytes]]] = []

    def check():
        bm.check_invariants()
        cpu.check_invariants()
        held: dict[int, int] = {}
        for t, _ in tables:
            for b in t:
                held[b] = held.get(b, 0) + 1
        for b in range(n):
            assert bm.ref_count(b) == held.get(b, 0), f"block {b}"
        assert bm.num_free_blocks == n - len(held)
        assert cpu.num_free_blocks == 8 - sum(len(t) for t, _ in swapped)
        for t, names in tables:  # a held, named block keeps its name: nobody evicted it under its holder
            for b, h in zip(t, names, strict=False):
                assert bm.name_of(b) in (None, h)

    for _ in range(3000):
        op = rng.random()
        if op < 0.35:  # admit: take the cached prefix, allocate the rest, name the full blocks computed
            names = block_hashes(rng.choice(vocab)[: rng.randint(1, 8) * bs], bs)
            want = rng.randint(1, len(names))
            hit = bm.acquire_prefix(names[:want])
            try:
                table = hit + bm.allocate(want - len(hit))
            except NoFreeBlocksError:
                bm.free(hit)
                check()
                continue
            for b, h in zip(table, names, strict=False):
                bm.register(b, h)
            tables.append((table, names[:want]))
        elif op < 0.45 and tables:  # fork: share a table
            t, names = rng.choice(tables)
            tables.append((bm.share(t), names))
        elif op < 0.55 and tables and cpu.can_allocate(len(tables[-1][0])):  # swap the newest out
            t, names = tables.pop()
            swapped.append((cpu.allocate(len(t)), names))
            bm.free(t)
        elif op < 0.65 and swapped:  # swap in: fresh device blocks, re-offered to the cache
            c, names = swapped[-1]
            if not bm.can_allocate(len(c)):
                check()
                continue
            swapped.pop()
            cpu.free(c)
            t = bm.allocate(len(c))
            for b, h in zip(t, names, strict=False):
                bm.register(b, h)
            tables.append((t, names))
        elif op < 0.68:
            bm.reset_prefix_cache()
        elif tables:  # finish
            t, _ = tables.pop(rng.randrange(len(tables)))
            bm.free(t)
        check()
    for t, _ in tables:
        bm.free(t)
    assert bm.num_free_blocks == n
    assert bm.num_evictions > 0 and bm.num_cached_blocks > 0  # the run did exercise eviction and reuse
    bm.check_invariants()
