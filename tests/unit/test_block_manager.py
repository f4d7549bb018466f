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
