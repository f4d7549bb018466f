"""Tensor parallelism in the engine (`engine.parallel`), on CPU over gloo: a TP engine is rank 0 (an
`LLMEngine` with a `TPGroup`) and its other ranks run `TPRank.serve` on threads of this process, each with
its own process group over real sockets, as the Ray rank actors do (tests/serve/test_tensor_parallel_serve.py
runs those). Greedy fp32 output equals TP=1 token for token (ragged batches of prefill chunks and decodes,
swap preemption, replicated KV heads), every block comes back, KV written and read through rank 0 lands on
every rank's heads, and a size the model does not split by is a typed error naming the numbers."""

from __future__ import annotations

import threading

import pytest
import torch

from pdserve.engine.config import ParallelConfig, PdserveConfig, TensorParallelError
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.parallel import TPGroup, TPRank, check_parallel, tp_store
from pdserve.engine.sampling import SamplingParams
from pdserve.kv_transfer.ranks import RankChannels, RankKeys
from tests.helpers import EXACT, GREEDY, check_no_leak, prompts, wait_for


def _config(model_dir, **sections) -> PdserveConfig:
    sections["cache"] = {"num_kv_blocks": 256, **sections.get("cache", {})}
    sections["model"] = {"model": str(model_dir), **EXACT, **sections.get("model", {})}
    return PdserveConfig().replace(**sections)


class TPEngine:
    """Rank 0's engine with ranks 1..size-1 serving on threads; `close` stops them and checks none failed."""

    made: list[TPEngine] = []

    def __init__(self, config: PdserveConfig, size: int):
        TPEngine.made.append(self)
        store, port = tp_store()
        self.errors: list[BaseException] = []
        self.ranks: list[TPRank] = []

        def run(r: int) -> None:
            try:
                rank = TPRank(config, config.model.model, TPGroup(r, size, torch.device("cpu"), "127.0.0.1", port, 60))
                RankChannels.register(rank, config.kv_transfer)  # as the rank actors do (`worker.tp`)
                self.ranks.append(rank)
                rank.serve()
            except BaseException as e:  # noqa: BLE001 (reported by close)
                self.errors.append(e)

        self.threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(1, size)]
        for t in self.threads:
            t.start()
        self.engine = LLMEngine(config, tp=TPGroup(0, size, torch.device("cpu"), "127.0.0.1", port, 60, store=store))

    def close(self) -> None:
        TPEngine.made.remove(self)
        self.engine.shutdown()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors
        assert not any(t.is_alive() for t in self.threads)


@pytest.fixture
def tp_engine():
    made: list[TPEngine] = []

    def make(config: PdserveConfig, size: int) -> LLMEngine:
        made.append(TPEngine(config, size))
        return made[-1].engine

    yield make
    for m in made:
        check_no_leak(m.engine)
        m.close()


def _greedy(engine: LLMEngine) -> list[list[int]]:
    return [o.output_token_ids for o in engine.generate(prompts(), GREEDY)]


@pytest.mark.parametrize("size", [2, 4])
def test_tp_greedy_equals_tp1_token_for_token(tiny_model_dir, make_engine, tp_engine, size):
    """TP=2 splits the tiny model's 4 heads and 2 KV heads; TP=4 replicates each KV head on 2 ranks. A small
    prefill chunk mixes prefill chunks with decodes in one packed step."""
    cfg = _config(tiny_model_dir, scheduler={"max_prefill_chunk": 16, "max_num_batched_tokens": 48})
    want = _greedy(make_engine(tiny_model_dir, scheduler={"max_prefill_chunk": 16, "max_num_batched_tokens": 48}))
    engine = tp_engine(cfg, size)
    assert engine.kv.num_kv_heads == max(1, 2 // size)  # rank 0 holds its own KV heads only
    assert engine.model.shard_arch.num_heads == 4 // size
    assert _greedy(engine) == want
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_tp_swap_preemption_equals_tp1(tiny_model_dir, make_engine, tp_engine):
    """A pool too small for every prompt at once: sequences swap out to (and back from) every rank's CPU pool."""
    sections = {"cache": {"num_kv_blocks": 12}, "scheduler": {"preemption": "swap", "swap_space_blocks": 16}}
    ref = make_engine(tiny_model_dir, **sections)
    want = _greedy(ref)
    engine = tp_engine(_config(tiny_model_dir, **sections), 2)
    assert _greedy(engine) == want
    assert engine.num_preemptions > 0 and engine.num_preemptions == ref.num_preemptions


@pytest.mark.parametrize("size", [2, 4])
def test_kv_written_through_rank0_reaches_every_rank(tiny_model_dir, tp_engine, size):
    """What KV transfer does on a TP decode worker: a layer of KV with all heads written through rank 0 lands
    on each rank's heads, and `export` gathers it back whole (and ranks hold only their own heads; at TP=4
    two ranks hold each KV head)."""
    engine = tp_engine(_config(tiny_model_dir), size)
    kv = engine.kv
    slots = kv.slots([3, 5], 0, 20)
    full = torch.randn(2, 20, 2, 16)
    for layer in range(kv.num_layers):
        kv.write_layer(layer, slots, full * (layer + 1))
    got = kv.export([3, 5], 20)
    for layer in range(kv.num_layers):
        torch.testing.assert_close(got[layer], full * (layer + 1), rtol=0, atol=0)
    assert kv.k[0].shape[1] == 1  # rank 0's own pool: one KV head


def test_a_tp_size_the_model_does_not_split_by_is_a_typed_error(tiny_model_dir, default_model_dir):
    from transformers import AutoConfig

    tiny = AutoConfig.from_pretrained(tiny_model_dir)  # 4 heads, 2 KV heads, intermediate 128
    cfg = PdserveConfig().replace(parallel={"tensor_parallel_size": 3})
    with pytest.raises(TensorParallelError, match="size 3 does not divide the model's 4 attention heads"):
        check_parallel(tiny, cfg)
    check_parallel(tiny, cfg.replace(parallel={"tensor_parallel_size": 4}))  # KV heads replicated
    smol = AutoConfig.from_pretrained(default_model_dir)  # 9 heads, 3 KV heads
    with pytest.raises(TensorParallelError, match="decode workers: .*size 2 does not divide the model's 9"):
        check_parallel(smol, PdserveConfig().replace(parallel={"decode_tp": 2}))
    check_parallel(smol, PdserveConfig().replace(parallel={"tensor_parallel_size": 3}))
    with pytest.raises(TensorParallelError, match="prefill_tp must be in"):
        ParallelConfig(prefill_tp=0)
    assert ParallelConfig(tensor_parallel_size=2, decode_tp=4).tp_for("prefill") == 2
    assert ParallelConfig(tensor_parallel_size=2, decode_tp=4).tp_for("decode") == 4


@pytest.mark.slow
def test_tp3_on_the_default_model_equals_tp1(default_model_dir, make_engine, tp_engine):
    """SmolLM2-135M: 9 heads and 3 KV heads split over 3 ranks (fp32)."""
    ps = prompts(lens=[5, 30])
    want = [o.output_token_ids for o in make_engine(None).generate(ps, GREEDY)]
    engine = tp_engine(_config(default_model_dir, cache={"num_kv_blocks": 64}), 3)
    assert [o.output_token_ids for o in engine.generate(ps, GREEDY)] == want


def test_tp_bf16_runs_the_fused_ops_on_local_heads(tiny_model_dir, make_engine, tp_engine):
    """bf16 on CPU: where the kernels' library runs, every rank's forward goes through the fused ops (RoPE + the
    KV write with its own head counts) and the kernels. Each rank's partial o_proj / down_proj rows are rounded
    to bf16 before the all-reduce, so TP=2 is not bit-equal to TP=1: long greedy continuations drift apart (seen
    on the 64-token prompt after a few tokens), as they do between bf16 engines on different hardware. The
    first token of every prompt (one prefill) agrees."""
    sections = {"model": {"dtype": "bfloat16"}}
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    want = [o.output_token_ids for o in make_engine(tiny_model_dir, **sections).generate(prompts(), first)]
    engine = tp_engine(_config(tiny_model_dir, **sections), 2)
    assert (engine.model.model.fused is not None) == (engine.attention.fused_ops is not None)
    assert [o.output_token_ids for o in engine.generate(prompts(), first)] == want


def _ranks(engine: LLMEngine) -> list[TPRank]:
    """The thread ranks of a `tp_engine` engine."""
    return next(m for m in TPEngine.made if m.engine is engine).ranks


def _rank_pair_bytes(transport: str) -> dict[tuple[str, str, str], float]:
    """`pdserve_kv_transfer_rank_pair_bytes` by (path, sender rank, receiver rank), for `transport`."""
    from prometheus_client import REGISTRY

    return {(s.labels["path"], s.labels["src_rank"], s.labels["dst_rank"]): s.value
            for m in REGISTRY.collect() if m.name == "pdserve_kv_transfer_rank_pair_bytes"
            for s in m.samples if s.name.endswith("_total") and s.labels["transport"] == transport}


def _transfer_pair(model_dir, make_engine, tp_engine, prefill_tp: int, decode_tp: int, kv_cfg: dict):
    """A prefill engine and a decode engine with these TP sizes, the decode one's KVReceiver (committed transfers
    on the returned queue) and the prefill one's KVSender (its layout from the engine)."""
    import queue

    from pdserve.kv_transfer import KVPool, KVReceiver, KVSender

    def engine(tp: int) -> LLMEngine:
        return tp_engine(_config(model_dir, kv_transfer=kv_cfg), tp) if tp > 1 else \
            make_engine(model_dir, kv_transfer=kv_cfg)

    pre, dec = engine(prefill_tp), engine(decode_tp)
    got: queue.Queue = queue.Queue()
    rx = KVReceiver(KVPool.from_engine(dec), dec.config.kv_transfer, got.put).start()
    pool = KVPool.from_engine(pre)
    ranks = RankKeys(pre.kv) if pre.per_rank_kv else None  # as the prefill worker does
    return pre, dec, rx, KVSender(pre.config.kv_transfer, pool.fingerprint, layout=pool.layout, ranks=ranks), got


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "transport", "per_rank", "pairs"), [
    (1, 2, "nccl", True, {(0, 0): 1, (0, 1): 1}),
    (2, 1, "nccl", True, {(0, 0): 1, (1, 0): 1}),
    (2, 2, "nccl", True, {(0, 0): 1, (1, 1): 1}),
    (4, 2, "nccl", True, {(0, 0): 1, (2, 1): 1}),  # 4 ranks share 2 KV heads: one replica of each sends it
    (1, 4, "nccl", True, {(0, 0): 1, (0, 1): 1, (0, 2): 1, (0, 3): 1}),  # ... and every replica receives it
    (1, 2, "grpc", True, {(0, 0): 1, (0, 1): 1}),
    (2, 1, "grpc", True, {(0, 0): 1, (1, 0): 1}),
    (1, 2, "grpc", False, None),
    (1, 2, "nccl", False, None),
])
def test_kv_transfer_between_tp_sizes(tiny_model_dir, make_engine, tp_engine, prefill_tp, decode_tp, transport,
                                      per_rank, pairs):
    """A prefill engine with one TP size ships every prompt's KV (real KVSender -> KVReceiver over gRPC, bytes on
    gloo channels for `nccl`, on the decode ranks' own gRPC endpoints for `grpc`) to a decode engine with another;
    decoding from it is greedy-equal to the TP=1 engine alone, and every block comes back on both sides (the prefill
    ranks' staged KV is dropped too). Over either transport, each (prefill rank, decode rank) pair with KV heads in
    common moves those heads on a channel of its own, from the rank that computed them to the rank that keeps them
    (counted per rank pair: 1 -> 2 is p0->d0 and p0->d1, 2 -> 1 p0->d0 and p1->d0, 2 -> 2 p0->d0 and p1->d1, 4 -> 2
    p0->d0 and p2->d1; nothing through a rank 0); with `per_rank_channels` off, every byte arrives at decode rank 0
    (the fallback path, labelled rank0)."""
    from pdserve.kv_transfer import LayerStream

    kv_cfg = {"kv_transport": transport, "per_rank_channels": per_rank}
    want = _greedy(make_engine(tiny_model_dir))
    pre, dec, rx, tx, got = _transfer_pair(tiny_model_dir, make_engine, tp_engine, prefill_tp, decode_tp, kv_cfg)
    before = _rank_pair_bytes(transport)
    try:
        assert tx.pair(rx.address).layout.tp_size == decode_tp
        futs = []
        for i, prompt in enumerate(prompts()):  # every prompt's prefill in one step: slices of one gathered layer
            tx.reserve(rx.address, f"r{i}", len(prompt))
            stream = LayerStream(f"r{i}", len(prompt))
            futs.append(tx.push(rx.address, stream))
            pre.add_request(f"r{i}", prompt, GREEDY, kv_sink=stream)
        while pre.has_unfinished():
            pre.step()
        total = sum(f.result(30).bytes for f in futs)
        received = sorted((got.get(timeout=10) for _ in futs), key=lambda r: int(r.request_id[1:]))
        for r in received:
            dec.add_received_request(r.request_id, r, GREEDY)
        outs: dict[str, list[int]] = {}
        while dec.has_unfinished():
            outs.update({o.request_id: o.output_token_ids for o in dec.step() if o.finished})
    finally:
        tx.close()
        rx.stop()
    assert [outs[f"r{i}"] for i in range(len(want))] == want
    moved = {k: v - before.get(k, 0.0) for k, v in _rank_pair_bytes(transport).items() if v != before.get(k, 0.0)}
    if pairs:  # each rank pair its common KV heads (`pairs`: how many, of 2), none through a rank 0
        assert moved == {("per_rank", str(i), str(j)): total * heads / 2 for (i, j), heads in pairs.items()}
    else:
        assert moved == {("rank0", "0", "0"): total}
    check_no_leak(pre)
    check_no_leak(dec)
    if pre.per_rank_kv:  # every shipment released; the ranks drop them with the next forward pass
        pre.generate([[1, 2]], SamplingParams(max_tokens=1))
        assert not pre.kv.take_drops() and all(not r.staged for r in _ranks(pre))


@pytest.mark.parametrize("transport", ["nccl", "grpc"])
def test_a_corrupt_part_on_a_per_rank_channel_fails_its_push_and_frees_every_block(tiny_model_dir, make_engine,
                                                                                   tp_engine, transport):
    """The sender flips a byte of the last decode rank's part after checksumming it: that rank's checksum, gathered
    to rank 0, fails the push (`ChecksumMismatch`), the reservation is released (the blocks the ranks wrote are never
    read), the channels of that push are closed on both sides, and the next push opens fresh ones and decodes what
    the TP=1 engine does (torch channels over gloo, or the decode ranks' gRPC endpoints)."""
    from pdserve.engine.config import FaultConfig
    from pdserve.kv_transfer import ChecksumMismatch, LayerStream

    prompt = prompts()[2]
    want = make_engine(tiny_model_dir).generate([prompt], GREEDY)[0].output_token_ids
    pre, dec, rx, tx, got = _transfer_pair(tiny_model_dir, make_engine, tp_engine, 1, 2, {"kv_transport": transport})

    def push(rid: str):
        tx.reserve(rx.address, rid, len(prompt))
        stream = LayerStream(rid, len(prompt))
        fut = tx.push(rx.address, stream)
        pre.add_request(rid, prompt, GREEDY, kv_sink=stream)
        while pre.has_unfinished():
            pre.step()
        return fut

    try:
        tx.faults = FaultConfig(transfer_corrupt_rate=1.0)
        with pytest.raises(ChecksumMismatch, match="part from sender rank 0 to rank 1 fails its checksum"):
            push("bad").result(30)
        wait_for(lambda: dec.block_manager.num_free_blocks == dec.block_manager.num_blocks, 10, "blocks back")
        assert rx.state_of("bad") == "released"
        tx.faults = None
        push("good").result(30)
        received = got.get(timeout=10)
        dec.add_received_request("good", received, GREEDY)
        out = None
        while dec.has_unfinished():
            out = next((o for o in dec.step() if o.finished), out)
        assert out.output_token_ids == want
    finally:
        tx.close()
        rx.stop()
    check_no_leak(pre)
    check_no_leak(dec)


def test_the_kv_pool_size_is_the_minimum_over_the_ranks():
    """What the profiling pass on CUDA ends with (`LLMEngine._num_kv_blocks_tp`, `TPRank._profile`: CUDA-only, never
    run here): each rank's count of the KV blocks its device has room for, reduced to the smallest over the group's
    gloo group, on every rank."""
    store, port = tp_store()
    got: dict[int, int] = {}

    def rank(r: int) -> None:
        group = TPGroup(r, 3, torch.device("cpu"), "127.0.0.1", port, 60, store=store if r == 0 else None)
        got[r] = group.min_over_ranks([700, 512, 900][r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {0: 512, 1: 512, 2: 512}
