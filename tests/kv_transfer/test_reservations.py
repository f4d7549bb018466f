"""The decode side's ownership state machine (kv_transfer.reservations.ReservationTable), driven
directly with a fake clock: every path returns each block exactly once. It and the typed errors
import without torch, gRPC or numpy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pdserve.kv_transfer import DuplicateRequest, MalformedTransfer, RequestReleased, ReservationRefused, UnknownRequest
from pdserve.kv_transfer.pool import KVPool
from pdserve.kv_transfer.reservations import ReservationTable, State
from tests.helpers import kv_fingerprint

FP = kv_fingerprint(num_layers=2)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def table():
    clock = Clock()
    t = ReservationTable(KVPool.standalone(FP, 10), lease_s=30, tombstone_ttl_s=60, clock=clock)
    t.clock_ = clock
    yield t
    t.pool.blocks.check_invariants()


def kv(n):
    return torch.randn(2, n, FP.num_kv_heads, FP.head_dim)


def fill(t, r):
    for layer in range(FP.num_layers):
        t.write(r, layer, 0, kv(r.num_tokens))


def test_happy_path_hands_the_blocks_over_once(table):
    r = table.reserve("a", 20)
    assert table.pool.num_free_blocks == 8 and r.state is State.RESERVED
    table.begin("a", 20)
    fill(table, r)
    rec = table.commit(r, list(range(20)), [5])
    assert rec.block_table == r.blocks and table.state_of("a") == "committed"
    assert table.release("a", "late") == "committed"  # too late: the decode engine owns the blocks
    assert table.pool.num_free_blocks == 8
    table.pool.blocks.free(rec.block_table)


@pytest.mark.parametrize("stage", ["reserved", "receiving", "partly written"])
def test_release_in_any_live_state_frees_exactly_once(table, stage):
    r = table.reserve("a", 20)
    if stage != "reserved":
        table.begin("a", 20)
    if stage == "partly written":
        table.write(r, 0, 0, kv(20))
    assert table.release("a", "aborted") == ("reserved" if stage == "reserved" else "receiving")
    assert table.pool.num_free_blocks == 10
    assert table.release("a", "again") == "released"
    assert table.pool.num_free_blocks == 10
    with pytest.raises(RequestReleased):
        table.write(r, 1, 0, kv(20))
    with pytest.raises(RequestReleased):
        table.commit(r, list(range(20)), [1])


def test_lease_expiry_and_tombstone_ttl(table):
    table.reserve("a", 5)
    table.reserve("b", 5, lease_s=10)  # a sender may ask for less, never more
    table.clock_.t += 10
    assert table.expire() == ["b"]
    table.clock_.t += 20
    assert table.expire() == ["a"] and table.pool.num_free_blocks == 10
    with pytest.raises(RequestReleased, match="lease_expired"):
        table.begin("a", 5)
    table.clock_.t += 61
    table.expire()
    with pytest.raises(UnknownRequest):  # forgotten after the tombstone TTL
        table.begin("a", 5)


def test_release_before_reserve_blocks_the_reserve(table):
    assert table.release("x", "client_disconnected") == "unknown"
    with pytest.raises(RequestReleased):
        table.reserve("x", 5)
    assert table.pool.num_free_blocks == 10


def test_refusals_allocate_nothing(table):
    with pytest.raises(ReservationRefused):
        table.reserve("big", 11 * 16)
    table.reserve("a", 9 * 16)
    with pytest.raises(ReservationRefused):
        table.reserve("b", 2 * 16)
    with pytest.raises(DuplicateRequest):
        table.reserve("a", 1)
    with pytest.raises(MalformedTransfer):
        table.reserve("zero", 0)
    assert table.pool.num_free_blocks == 1
    table.release("a", "done")


def test_chunks_are_checked_before_they_touch_the_pool(table):
    r = table.reserve("a", 20)
    table.begin("a", 20)
    with pytest.raises(DuplicateRequest):
        table.begin("a", 20)
    before = table.pool.kv.data.clone()
    for layer, start, n in [(2, 0, 20), (0, 1, 5), (0, 0, 21), (0, 0, 0)]:
        with pytest.raises(MalformedTransfer):
            table.write(r, layer, start, kv(n))
    with pytest.raises(MalformedTransfer):
        table.write(r, 0, 0, torch.randn(2, 20, FP.num_kv_heads, FP.head_dim + 1))
    assert torch.equal(table.pool.kv.data, before)
    table.write(r, 0, 0, kv(12))
    table.write(r, 0, 12, kv(8))
    with pytest.raises(MalformedTransfer, match="incomplete"):
        table.commit(r, list(range(20)), [1])
    table.write(r, 1, 0, kv(20))
    with pytest.raises(MalformedTransfer, match="do not fit"):
        table.commit(r, list(range(20)), [])
    table.release("a", "test over")


@pytest.mark.parametrize("layers,tokens,bpt,limit", [(30, 2913, 1536, 4 << 20), (30, 364, 1536, 4 << 20),
                                                     (30, 1, 1536, 4 << 20), (7, 100, 100, 999), (3, 5, 64, 64),
                                                     (30, 22, 1536, 1 << 30)])
def test_chunk_plan_covers_every_layer_and_token_once_within_the_limit(layers, tokens, bpt, limit):
    from pdserve.kv_transfer.protocol import plan_chunks

    seen = torch.zeros(layers, tokens, dtype=torch.int32)
    chunks = plan_chunks(0, layers, tokens, bpt, limit)
    for layer, nl, s, e in chunks:
        assert nl * (e - s) * bpt <= max(limit, bpt) and e > s
        seen[layer:layer + nl, s:e] += 1
    assert bool((seen == 1).all())
    if tokens * bpt <= limit:  # small layers are packed: as few messages as the limit allows
        assert len(chunks) == -(-layers // (limit // (tokens * bpt)))


def test_reservations_and_errors_import_without_torch_grpc_or_numpy():
    """A fresh interpreter (this one has torch loaded already); the package's own names stay lazily
    importable from it, and the old homes re-export the moved classes."""
    code = ("import sys; import pdserve.kv_transfer.reservations, pdserve.kv_transfer.errors; "
            "heavy = {'torch', 'grpc', 'numpy'} & set(sys.modules); assert not heavy, sorted(heavy); "
            "from pdserve.kv_transfer import ReservationRefused, KVSender; "
            "assert 'torch' in sys.modules and 'grpc' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from pdserve import kv_transfer
    from pdserve.kv_transfer import errors, pool, protocol, reservations

    assert pool.ReservationTable is reservations.ReservationTable and pool.ReceivedKV is reservations.ReceivedKV
    assert protocol.ReservationRefused is errors.ReservationRefused is kv_transfer.ReservationRefused
    assert all(getattr(kv_transfer, name) is not None for name in kv_transfer.__all__)
    with pytest.raises(AttributeError):
        kv_transfer.NoSuchName  # noqa: B018
