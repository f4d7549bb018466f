"""The router's prefix index (`router.prefix_index`): leading-name overlap, the LRU bound per worker
(a prefix's tail evicted before its head), workers joining empty and leaving without a trace, and
reconciling with what a worker reports (cleared at 0 cached blocks, trimmed to fewer). Pure: no Ray."""

from __future__ import annotations

from pdserve.engine.block_manager import block_hashes
from pdserve.router.prefix_index import PrefixIndex

BS = 4


def names(tokens: list[int]) -> list[bytes]:
    return block_hashes(tokens, BS)


SHARED = list(range(100, 116))  # 4 full blocks


def test_overlap_counts_leading_names_only():
    index = PrefixIndex()
    index.add_worker("d0", 100)
    index.insert("d0", names(SHARED + [1, 2, 3, 4]))
    assert index.overlap("d0", names(SHARED + [1, 2, 3, 4])) == 5
    assert index.overlap("d0", names(SHARED + [9, 9, 9, 9, 5])) == 4  # diverges in the fifth block
    assert index.overlap("d0", names([7] + SHARED)) == 0  # same tokens shifted: other names from the first block
    assert index.overlap("d0", names(SHARED[:3])) == 0  # not one full block
    assert index.overlap("d1", names(SHARED)) == 0  # unknown worker


def test_names_match_what_a_worker_computes_for_the_same_tokens():
    """The router names blocks with the engine's own function: a prefix of a longer sequence has the
    longer sequence's leading names, so a request's continuation finds what its prompt left cached."""
    prompt = names(SHARED)
    assert names(SHARED + list(range(20)))[:len(prompt)] == prompt


def test_each_worker_holds_at_most_its_pool_size_least_recently_used_first():
    index = PrefixIndex()
    index.add_worker("d0", 6)
    a, b = names(list(range(16))), names(list(range(50, 66)))  # 4 blocks each
    index.insert("d0", a)
    index.insert("d0", b)  # 8 names > 6: two of a's go, its tail first
    assert index.size("d0") == 6
    assert index.overlap("d0", b) == 4
    assert index.overlap("d0", a) == 2  # its head survives: a tail without its head is of no use
    index.insert("d0", a)  # used again: a is the most recent now, b's tail goes
    assert index.overlap("d0", a) == 4 and index.overlap("d0", b) == 2


def test_a_prefix_longer_than_the_pool_keeps_its_head():
    index = PrefixIndex()
    index.add_worker("d0", 3)
    long = names(list(range(40)))  # 10 blocks
    index.insert("d0", long)
    assert index.size("d0") == 3 and index.overlap("d0", long) == 3


def test_a_removed_worker_is_forgotten_and_a_rejoining_one_starts_empty():
    index = PrefixIndex()
    for w in ("d0", "d1"):
        index.add_worker(w, 100)
        index.insert(w, names(SHARED))
    index.drop("d0")
    assert index.workers() == ["d1"] and index.overlap("d0", names(SHARED)) == 0
    index.insert("d0", names(SHARED))  # a request that finishes on a worker already gone: no resurrection
    assert index.workers() == ["d1"] and index.size("d0") == 0
    index.add_worker("d1", 100)  # joins again (a restarted router adopting it): what it held is unknown
    assert index.overlap("d1", names(SHARED)) == 0


def test_reconcile_clears_a_worker_that_reports_nothing_cached_and_trims_one_that_reports_less():
    index = PrefixIndex()
    index.add_worker("d0", 100)
    a, b = names(list(range(16))), names(list(range(50, 66)))
    index.insert("d0", a)
    index.insert("d0", b)
    index.reconcile("d0", 8)  # agrees: nothing changes
    assert index.overlap("d0", a) == 4 and index.overlap("d0", b) == 4
    index.reconcile("d0", 5)  # it evicted: keep the 5 most recently routed names
    assert index.size("d0") == 5 and index.overlap("d0", b) == 4 and index.overlap("d0", a) == 1
    index.reconcile("d0", 0)  # restarted or reset
    assert index.size("d0") == 0 and index.workers() == ["d0"]
    index.reconcile("gone", 0)  # a worker the index does not know: nothing to do
    assert index.workers() == ["d0"]
