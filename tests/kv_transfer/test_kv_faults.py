"""Config-driven fault injection on the KV plane (`faults`, chaos testing), through a real
receiver and sender on both transports: every injected fault ends in a typed error on the
prefill side, a fully free pool and nothing committed on the decode side; faults off (or at
rate 0) changes nothing; a seed makes the faulted transfers repeatable."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from prometheus_client import REGISTRY

from pdserve.engine.config import FaultConfig, KVTransferConfig
from pdserve.kv_transfer import (
    ChecksumMismatch,
    KVPool,
    KVReceiver,
    KVSender,
    KVTransferError,
    LayerStream,
    MalformedTransfer,
    TransferCancelled,
)
from pdserve.kv_transfer.faults import FaultInjector, InjectedFault
from tests.helpers import kv_fingerprint, wait_for

FP = kv_fingerprint(num_layers=4)
N = 20  # tokens per transfer: 20 x 256 bytes per layer, split into 3 chunks of at most 2 KiB
TRANSPORTS = ["grpc", "nccl"]
EXPECTED = {  # fault -> (error on the prefill side, reason of the receiver's failure metric)
    "fail": (InjectedFault, "released"),
    "drop": (MalformedTransfer, "malformed"),
    "corrupt": (ChecksumMismatch, "checksum"),
}


class Side:
    """One decode worker's receiver over a standalone pool, and a prefill worker's sender."""

    def __init__(self, transport: str, faults: FaultConfig | None = None, chunk_bytes: int = 2048):
        self.transport = transport
        self.pool = KVPool.standalone(FP, 32)
        self.pool.kv.data.normal_()
        self.committed = []
        self.rx = KVReceiver(self.pool, KVTransferConfig(kv_transport=transport), self.committed.append).start()
        self.tx = KVSender(KVTransferConfig(kv_transport=transport, chunk_bytes=chunk_bytes), FP, faults=faults)
        self._n = 0

    def push(self, layerwise: bool = False) -> tuple[str, dict[int, torch.Tensor], object]:
        """Reserve, then push random KV; returns (request id, the shipped layers, the push future)."""
        self._n += 1
        rid = f"r{self._n}"
        layers = {i: torch.randn(2, N, FP.num_kv_heads, FP.head_dim) for i in range(FP.num_layers)}
        self.tx.reserve(self.rx.address, rid, N)
        if layerwise:  # layers ready one at a time (the engine's layer-wise pipelining)
            stream = LayerStream(rid, N)
            fut = self.tx.push(self.rx.address, stream)
            for i, kv in layers.items():
                stream.put_layer(i, kv)
            stream.commit(list(range(N)), [7])
        else:
            stream = LayerStream.complete(rid, [layers[i] for i in range(FP.num_layers)], list(range(N)), [7])
            fut = self.tx.push(self.rx.address, stream)
        return rid, layers, fut

    def take_committed(self, rid: str, layers: dict[int, torch.Tensor]) -> None:
        """The one committed transfer holds exactly the shipped KV; give its blocks back."""
        (rec,) = self.committed
        assert rec.request_id == rid and rec.num_tokens == N
        got = self.pool.kv.export(rec.block_table, N)
        for i, t in enumerate(got):
            assert torch.equal(t, layers[i]), f"layer {i} differs after transfer"
        self.committed.clear()
        with self.pool.lock:
            self.pool.blocks.free(rec.block_table)

    def assert_clean(self) -> None:
        assert self.pool.num_free_blocks == self.pool.blocks.num_blocks, "blocks leaked"
        assert not self.rx.table.live

    def close(self) -> None:
        self.tx.close()
        self.rx.stop()


@pytest.fixture
def side():
    made: list[Side] = []

    def make(transport: str, faults: FaultConfig | None = None, **kw) -> Side:
        s = Side(transport, faults, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
        s.assert_clean()


def _sample(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _failures(transport: str, reason: str) -> float:
    return _sample("pdserve_kv_transfer_failures_total", {"transport": transport, "reason": reason})


def _injected(transport: str, fault: str) -> float:
    return _sample("pdserve_injected_faults_total", {"transport": transport, "fault": fault})


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", list(EXPECTED))
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_fault_at_rate_one_fails_typed_and_frees_the_reservation(side, transport, fault, layerwise):
    s = side(transport, FaultConfig(**{f"transfer_{fault}_rate": 1.0}, seed=3))
    error, reason = EXPECTED[fault]
    failures0, injected0 = _failures(transport, reason), _injected(transport, fault)
    for _ in range(2):  # the second push runs after the first failure (on nccl: on a fresh channel)
        rid, _, fut = s.push(layerwise)
        with pytest.raises(error) as e:
            fut.result(20)
        assert isinstance(e.value, KVTransferError)  # the prefill worker answers a retryable 503
        # The decode side released before the sender saw the error (the receiver fails a bad chunk
        # before answering; an injected failure is released before the future raises).
        assert s.pool.num_free_blocks == s.pool.blocks.num_blocks
        assert s.rx.state_of(rid) == "released"
        assert not s.committed, "a faulted transfer was committed"
        # Both ends tore the failed push's channel down (or never opened one): none is left open.
        if transport == "nccl":
            assert len(s.rx.planes["torch"].channels) == len(s.tx.plane.channels) == 0
    assert _failures(transport, reason) - failures0 == 2
    assert _injected(transport, fault) - injected0 == 2
    s.tx.faults = None  # off at run time: the next push goes through
    rid, layers, fut = s.push(layerwise)
    assert fut.result(20).bytes == N * FP.bytes_per_token_layer * FP.num_layers
    s.take_committed(rid, layers)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_faults_off_or_at_rate_zero_change_nothing(side, transport):
    for faults in (None, FaultConfig(), FaultConfig(seed=5, transfer_delay_rate=1.0),  # a delay of 0 s is off
                   FaultConfig(seed=5, transfer_delay_s=3.0)):
        assert not FaultInjector(faults).active
    zero = FaultConfig(transfer_fail_rate=0.0, transfer_drop_rate=0.0, transfer_corrupt_rate=0.0,
                       transfer_delay_rate=0.0, transfer_delay_s=0.0, seed=5)
    s = side(transport, zero)
    assert s.tx.faults == zero
    injected0 = [_injected(transport, f) for f in ("fail", "drop", "corrupt", "delay")]
    for layerwise in (False, True, False):
        rid, layers, fut = s.push(layerwise)
        assert fut.result(20).bytes == N * FP.bytes_per_token_layer * FP.num_layers
        s.take_committed(rid, layers)  # bit-identical
    assert [_injected(transport, f) for f in ("fail", "drop", "corrupt", "delay")] == injected0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_delay_holds_the_transfer_back_then_it_succeeds(side, transport):
    s = side(transport, FaultConfig(transfer_delay_rate=1.0, transfer_delay_s=0.3))
    injected0 = _injected(transport, "delay")
    t0 = time.perf_counter()
    rid, layers, fut = s.push()
    result = fut.result(20)
    took = time.perf_counter() - t0
    assert result.seconds >= 0.3 and took >= 0.3
    assert _injected(transport, "delay") - injected0 == 1
    s.take_committed(rid, layers)


def _run(s: Side, n: int) -> list[str]:
    """n transfers; what became of each: 'ok' or the error's type."""
    outcomes = []
    for _ in range(n):
        rid, layers, fut = s.push()
        try:
            fut.result(20)
        except KVTransferError as e:
            outcomes.append(type(e).__name__)
            assert not s.committed
        else:
            outcomes.append("ok")
            s.take_committed(rid, layers)
        assert s.pool.num_free_blocks == s.pool.blocks.num_blocks
    return outcomes


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fractional_rate_is_repeatable_with_a_seed(side, transport):
    faults = FaultConfig(transfer_corrupt_rate=0.3, seed=12)
    s = side(transport, faults)
    first = _run(s, 20)
    failed = first.count("ChecksumMismatch")
    assert 2 <= failed <= 12 and failed + first.count("ok") == 20, first  # 6 of 20 expected
    other = side(transport, faults)  # another sender with the same seed: the same transfers fail
    assert _run(other, 20) == first
    s.tx.faults = faults  # setting the config again restarts its RNG
    assert _run(s, 20) == first
    s.tx.faults = FaultConfig(transfer_corrupt_rate=0.3, seed=13)
    assert _run(s, 20) != first  # (another seed, another run: true of these two seeds)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mixed_faults_each_show_their_own_error(side, transport):
    faults = FaultConfig(transfer_fail_rate=0.1, transfer_drop_rate=0.1, transfer_corrupt_rate=0.1, seed=11)
    first = _run(side(transport, faults), 20)
    assert set(first) == {"ok", "InjectedFault", "MalformedTransfer", "ChecksumMismatch"}, first  # for this seed
    assert 3 <= sum(o != "ok" for o in first) <= 14, first  # 27% expected: 5.4 of 20
    assert _run(side(transport, faults), 20) == first


def test_a_delayed_transfer_can_be_cancelled(side):
    s = side("grpc", FaultConfig(transfer_delay_rate=1.0, transfer_delay_s=60.0))
    delays0 = _injected("grpc", "delay")
    rid, _, fut = s.push()
    wait_for(lambda: _injected("grpc", "delay") > delays0, 10, "the transfer to be held back")
    s.tx.cancel(rid)
    with pytest.raises(TransferCancelled):
        fut.result(10)
    assert s.pool.num_free_blocks == s.pool.blocks.num_blocks and s.rx.state_of(rid) == "released"
    assert not s.committed


def test_injector_decisions_follow_the_rates():
    """The plans alone, over many draws: each rate is honoured, and a seed fixes the sequence."""
    cfg = FaultConfig(transfer_fail_rate=0.2, transfer_corrupt_rate=0.5, transfer_delay_rate=0.25,
                      transfer_delay_s=0.1, seed=1)
    inj, again = FaultInjector(cfg), FaultInjector(cfg)
    plans = [inj.plan(4) for _ in range(4000)]
    assert plans == [again.plan(4) for _ in range(4000)]
    fails = sum(bool(p and p.fail) for p in plans) / 4000
    corrupt = sum(bool(p and p.chunk == "corrupt") for p in plans) / 4000
    delays = sum(bool(p and p.delay_s) for p in plans) / 4000
    assert abs(fails - 0.2) < 0.03 and abs(corrupt - 0.5 * 0.8) < 0.04 and abs(delays - 0.25) < 0.03
    assert all(p.layer in range(4) for p in plans if p and p.chunk)
    assert all(p is None for p in (FaultInjector(FaultConfig(seed=1)).plan(4) for _ in range(100)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_corrupted_chunk_fails_either_checksum_and_leaves_the_source_alone(dtype):
    from pdserve.kv_transfer.faults import corrupt_tensor, corrupt_wire_bytes
    from pdserve.kv_transfer.protocol import bytes_checksum, checksum, encode_chunk_data
    from pdserve.kv_transfer.v1 import kv_transfer_pb2 as pb

    kv = torch.randn(2, 5, 2, 16).to(dtype)
    original = kv.clone()
    for algo in (pb.CHECKSUM_ALGO_CRC32C, pb.CHECKSUM_ALGO_SUM64):  # SUM64: what CUDA tensors use
        assert checksum(corrupt_tensor(kv), algo) != checksum(kv, algo)
    assert torch.equal(kv, original)
    data, n, crc = encode_chunk_data([kv])
    bad = corrupt_wire_bytes(data, n)
    assert len(bad) == len(data) and bad[:-n] == data[:-n]  # only the payload changed
    assert bytes_checksum(data[-n:]) == crc != bytes_checksum(bad[-n:])


def test_kv_helper_threads_run_torch_serially():
    # a helper thread with torch's thread count would add an OpenMP team and put the engine's threads to
    # sleep between ops (`engine.platform.serial_torch_thread`); the caller's own count must not change
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        side = Side("nccl")
        rid, layers, fut = side.push()
        fut.result(timeout=60)
        side.take_committed(rid, layers)
        on_loop = lambda loop: asyncio.run_coroutine_threadsafe(_num_threads(), loop).result(10)  # noqa: E731
        assert on_loop(side.rx._loop) == 1 and on_loop(side.tx._loop) == 1
        for plane in side.rx.planes.values():
            executor = getattr(plane, "executor", None)
            if executor is not None:
                assert executor.submit(torch.get_num_threads).result(10) == 1
        assert torch.get_num_threads() == 2
        side.assert_clean()
        side.close()
    finally:
        torch.set_num_threads(before)


async def _num_threads() -> int:
    return torch.get_num_threads()
