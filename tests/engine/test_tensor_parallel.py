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
from tests.helpers import EXACT, GREEDY, check_no_leak, prompts


def _config(model_dir, **sections) -> PdserveConfig:
    sections["cache"] = {"num_kv_blocks": 256, **sections.get("cache", {})}
    sections["model"] = {"model": str(model_dir), **EXACT, **sections.get("model", {})}
    return PdserveConfig().replace(**sections)


class TPEngine:
    """Rank 0's engine with ranks 1..size-1 serving on threads; `close` stops them and checks none failed."""

    def __init__(self, config: PdserveConfig, size: int):
        store, port = tp_store()
        self.errors: list[BaseException] = []
        self.ranks: list[TPRank] = []

        def run(r: int) -> None:
            try:
                rank = TPRank(config, config.model.model, TPGroup(r, size, torch.device("cpu"), "127.0.0.1", port, 60))
                self.ranks.append(rank)
                rank.serve()
            except BaseException as e:  # noqa: BLE001 (reported by close)
                self.errors.append(e)

        self.threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(1, size)]
        for t in self.threads:
            t.start()
        self.engine = LLMEngine(config, tp=TPGroup(0, size, torch.device("cpu"), "127.0.0.1", port, 60, store=store))

    def close(self) -> None:
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
