"""KV copies off the compute stream (`engine.streams`) and the swap copy (`PagedKVCache.copy_blocks_to`).

On CPU: the abstraction is a no-op (complete events, no stream, no staging copy), the swap copy moves the
right blocks, and the device checksum (one host wait for both sums) is the documented function. `gpu`:
real streams, that a copy queued behind a layer's event runs while the compute stream is still busy, that
a swap-out is complete when it returns, and that received KV is handed over or freed only after its copy."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.streams import DONE, TransferStream, transfer_stream
from pdserve.kv_transfer.pool import KVPool
from pdserve.kv_transfer.protocol import checksum
from pdserve.kv_transfer.reservations import ReservationTable
from pdserve.kv_transfer.v1 import kv_transfer_pb2 as pb
from tests.helpers import kv_fingerprint

FP = kv_fingerprint(num_layers=2)


def test_on_cpu_events_are_complete_and_staging_is_the_tensor_itself():
    xfer = TransferStream("cpu")
    assert not xfer.is_async
    assert xfer.record_compute() is DONE and xfer.record() is DONE and DONE.done
    t = torch.randn(2, 3)
    with xfer.use(after=xfer.record_compute()):
        assert xfer.to_host(t) is t and xfer.to_device(t) is t
    DONE.synchronize()
    xfer.compute_waits(DONE)
    assert xfer.run(torch.add, t, 1).equal(t + 1)


def test_one_transfer_stream_per_device():
    assert transfer_stream("cpu") is transfer_stream(torch.device("cpu"))


def _pool(device, num_blocks=8, seed=0):
    kv = PagedKVCache(2, num_blocks, 4, 2, 8, torch.float32, torch.device(device))
    kv.data.copy_(torch.randn(kv.data.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


@pytest.mark.parametrize("pairs", [[(3, 0), (1, 5)], [(0, 7)], [(i, 7 - i) for i in range(8)]])
def test_copy_blocks_moves_exactly_the_named_blocks(pairs):
    src, dst = _pool("cpu"), _pool("cpu", seed=1)
    before = dst.data.clone()
    src.copy_blocks_to(dst, pairs)
    for s, d in pairs:
        assert torch.equal(dst.data[:, :, d], src.data[:, :, s])
    untouched = [b for b in range(8) if b not in {d for _, d in pairs}]
    assert torch.equal(dst.data[:, :, untouched], before[:, :, untouched])


def test_device_checksum_sums_words_and_position_weighted_words():
    t = torch.randn(3, 5, dtype=torch.float32)
    words = [int.from_bytes(t.numpy().tobytes()[i:i + 4], "little", signed=True) for i in range(0, t.numel() * 4, 4)]
    s1 = sum(words) & 0xFFFFFFFF
    s2 = sum(w * (i % 65521 + 1) for i, w in enumerate(words)) & 0xFFFFFFFF
    assert checksum(t, pb.CHECKSUM_ALGO_SUM64) == (s2 << 32) | s1
    odd = torch.arange(3, dtype=torch.uint8)  # padded to a whole word
    assert checksum(odd, pb.CHECKSUM_ALGO_SUM64) == ((0x020100 << 32) | 0x020100)


# -- CUDA only ----------------------------------------------------------------------------------------
def _busy(ms: float = 200) -> None:
    """Keep the current stream busy for about `ms` (a spin kernel)."""
    torch.cuda._sleep(int(ms * 1e6))  # cycles, about 1 GHz


@pytest.mark.gpu
def test_a_copy_behind_a_layers_event_runs_while_the_compute_stream_is_busy():
    xfer = TransferStream("cuda")
    compute = torch.cuda.current_stream()
    layer = torch.zeros(1 << 20, device="cuda")
    layer.fill_(3.0)  # the layer's KV write, on the compute stream
    written = xfer.record_compute()
    _busy()  # the next layers
    with xfer.use(after=written):
        host = xfer.to_host(layer)
        copied = xfer.record()
    assert host.is_pinned()
    copied.synchronize()
    assert not compute.query(), "the copy waited for the compute stream's later work"
    assert bool((host == 3.0).all())
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_a_copy_waits_for_the_layer_it_was_queued_behind():
    xfer = TransferStream("cuda")
    layer = torch.zeros(1 << 20, device="cuda")
    _busy()
    layer.fill_(5.0)  # lands only after the busy kernel
    with xfer.use(after=xfer.record_compute()):
        host = xfer.to_host(layer)
        copied = xfer.record()
    copied.synchronize()
    assert bool((host == 5.0).all())


@pytest.mark.gpu
def test_a_swap_out_is_complete_when_it_returns():
    gpu, cpu = _pool("cuda", num_blocks=64), PagedKVCache(2, 64, 4, 2, 8, torch.float32, torch.device("cpu"))
    _busy()
    gpu.data.fill_(7.0)  # queued behind the busy kernel: a copy read before it finishes reads the old values
    gpu.copy_blocks_to(cpu, [(i, 63 - i) for i in range(64)])
    assert bool((cpu.data == 7.0).all())
    back = _pool("cuda", num_blocks=64, seed=3)
    cpu.copy_blocks_to(back, [(63, 0)])
    assert bool((back.data[:, :, 0] == 7.0).all())


@pytest.mark.gpu
def test_received_kv_is_freed_only_after_its_copy_has_landed():
    pool = KVPool.standalone(FP, 10, "cuda")
    table = ReservationTable(pool, lease_s=30)
    r = table.reserve("r", 20)
    table.begin("r", 20)
    kv = torch.randn(2, 20, FP.num_kv_heads, FP.head_dim)
    with pool.transfer.use():
        _busy()  # the transfer stream is busy: the write lands after this
    table.write(r, 0, 0, kv)
    assert r.landed is not DONE and not r.landed.done
    table.release("r", "aborted")
    assert r.landed.done and pool.num_free_blocks == 10
    r = table.reserve("s", 20)
    table.begin("s", 20)
    table.write(r, 0, 0, kv)
    r.landed.synchronize()
    assert torch.equal(pool.kv.export(r.blocks, 20)[0].cpu(), kv)
    table.release("s", "done")
