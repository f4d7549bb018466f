"""Automatic prefix caching in the engine, on a tiny random-weight model: requests that share a prefix
(a system prompt, an earlier turn of the conversation) reuse its KV, and greedy output stays identical
to HF's and to the engine with caching off, across chunking, preemption, eviction and hand-over."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampling import SamplingParams
from tests.helpers import check_no_leak, hf_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = tokens(70, seed=11)  # a shared "system prompt": 4 full blocks of 16, 17 of 4
PROMPTS = [SYSTEM + tokens(n, seed=20 + n) for n in (1, 9, 23, 2)] + [tokens(30, seed=5), SYSTEM[:40]]


def run_one_by_one(engine, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    return [engine.generate([p], params)[0].output_token_ids for p in prompts]


@pytest.mark.parametrize("block_size,chunk", [(16, None), (4, 7), (1, None)])
def test_shared_prefix_hits_and_greedy_output_is_unchanged(make_engine, tiny_model_dir, tiny_hf, block_size, chunk):
    on = make_engine(tiny_model_dir, cache={"block_size": block_size}, scheduler={"max_prefill_chunk": chunk})
    off = make_engine(tiny_model_dir, cache={"block_size": block_size, "enable_prefix_caching": False})
    got = run_one_by_one(on, PROMPTS)
    assert got == run_one_by_one(off, PROMPTS)
    assert got == [hf_greedy(tiny_hf, p, GREEDY.max_tokens) for p in PROMPTS]
    s = on.scheduler
    # the three later prompts that start with SYSTEM find its full blocks cached, SYSTEM[:40] all but its last
    # token's block (that token is always computed)
    full = len(SYSTEM) // block_size * block_size
    assert s.prefix_cache_hits >= 3 * full + (40 - 1) // block_size * block_size
    assert off.scheduler.prefix_cache_hits == 0 and off.block_manager.num_cached_blocks == 0
    assert on.block_manager.num_evictable_blocks > 0  # cached after the requests ended, yet counted free
    check_no_leak(on)


def test_a_batch_sharing_a_prefix_computes_it_once_per_step_and_matches_hf(make_engine, tiny_model_dir, tiny_hf):
    """Requests arriving together while the prefix is cached share its blocks (ref counts > 1)."""
    engine = make_engine(tiny_model_dir, cache={"block_size": 4})
    engine.generate([SYSTEM + [1]], GREEDY)  # warm the cache
    for i, p in enumerate(PROMPTS[:4]):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()
    shared = engine.seqs["r0"].block_table[: len(SYSTEM) // 4]
    assert all(engine.block_manager.ref_count(b) == 4 for b in shared)
    assert all(engine.seqs[f"r{i}"].num_cached_tokens == len(SYSTEM) // 4 * 4 for i in range(4))
    results = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.output_token_ids
    assert [results[f"r{i}"] for i in range(4)] == [hf_greedy(tiny_hf, p, GREEDY.max_tokens) for p in PROMPTS[:4]]
    check_no_leak(engine)


def test_the_next_turn_reuses_the_previous_turns_prompt_and_answer(make_engine, tiny_model_dir, tiny_hf):
    """Multi-turn chat: turn 2's prompt is turn 1's prompt + its answer + a new question; the blocks of
    all of that decoded here are cached, including those the answer filled during decoding."""
    engine = make_engine(tiny_model_dir, cache={"block_size": 4})
    first = SYSTEM + tokens(5, seed=1)
    answer = engine.generate([first], GREEDY)[0].output_token_ids
    second = first + answer + tokens(6, seed=2)
    seq_hits0 = engine.scheduler.prefix_cache_hits
    out = engine.generate([second], GREEDY)[0]
    cached = engine.scheduler.prefix_cache_hits - seq_hits0
    computed_in_turn_1 = len(first) + len(answer) - 1  # the last answer token was sampled, never computed
    assert cached == computed_in_turn_1 // 4 * 4
    assert out.output_token_ids == hf_greedy(tiny_hf, second, GREEDY.max_tokens)
    check_no_leak(engine)


def test_eviction_under_pressure_keeps_output_and_counts(make_engine, tiny_model_dir, tiny_hf):
    """A pool far smaller than the prefixes it sees: cached blocks are evicted to admit new requests
    (and requests are preempted), output stays exact, and every block ends free or evictable."""
    engine = make_engine(tiny_model_dir, cache={"block_size": 4, "num_kv_blocks": 40})
    ps = [tokens(60, seed=s) for s in range(5)] + [SYSTEM + [3]] + [tokens(60, seed=s) + [1] for s in range(3)]
    outs = engine.generate(ps, GREEDY)
    assert [o.output_token_ids for o in outs] == [hf_greedy(tiny_hf, p, GREEDY.max_tokens) for p in ps]
    assert engine.block_manager.num_evictions > 0
    again = run_one_by_one(engine, ps[-3:])
    assert again == [o.output_token_ids for o in outs[-3:]]
    engine.block_manager.check_invariants()
    check_no_leak(engine)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_with_shared_blocks_keeps_output(make_engine, tiny_model_dir, tiny_hf, mode):
    engine = make_engine(tiny_model_dir, cache={"block_size": 4, "num_kv_blocks": 48},
                         scheduler={"preemption": mode, "swap_space_blocks": 64 if mode == "swap" else 0})
    engine.generate([SYSTEM + [1]], GREEDY)
    ps = [SYSTEM + tokens(8, seed=s) for s in range(4)]
    outs = engine.generate(ps, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert engine.num_preemptions > 0
    assert [o.output_token_ids for o in outs] == [hf_greedy(tiny_hf, p, 24) for p in ps]
    check_no_leak(engine)


def test_abort_of_a_request_holding_shared_blocks_leaves_them_to_the_others(make_engine, tiny_model_dir, tiny_hf):
    engine = make_engine(tiny_model_dir, cache={"block_size": 4})
    engine.generate([SYSTEM + [1]], GREEDY)
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    engine.step()
    engine.abort("a")
    results = {}
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id] = out
    assert results["b"].output_token_ids == hf_greedy(tiny_hf, PROMPTS[1], GREEDY.max_tokens)
    check_no_leak(engine)
