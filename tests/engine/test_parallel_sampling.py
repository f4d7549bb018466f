"""Parallel sampling (n > 1) in the engine, on a tiny random-weight model: a request forked from another of
the same prompt (`add_request(fork_of=)`) shares its prompt KV blocks and computes only the last prompt
block; each fork samples with its own generator, so with seeds the forks equal separate requests with those
seeds, greedy forks equal HF, and every block comes back however a fork ends."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampling import SamplingParams
from tests.helpers import hf_greedy

PROMPT = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(3)).tolist()  # 2 full blocks + 13


def run(engine, rids: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.output_token_ids
    return {r: out[r] for r in rids}


def forked(engine, params: list[SamplingParams]) -> tuple[dict[str, list[int]], list[int]]:
    """Request 0 runs until its prompt is computed, then the others fork from it; returns the outputs and the
    prompt tokens each fork computed itself."""
    engine.add_request("r0", PROMPT, params[0])
    engine.step()  # prefill: r0's prompt KV is computed
    seqs = [engine.add_request(f"r{i}", PROMPT, p, fork_of="r0") for i, p in enumerate(params) if i]
    shared = [s.num_forked_tokens for s in seqs]
    return run(engine, [f"r{i}" for i in range(len(params))]), shared


@pytest.mark.parametrize("caching", [True, False])
def test_seeded_forks_equal_separate_requests_with_those_seeds(make_engine, tiny_model_dir, caching):
    engine = make_engine(tiny_model_dir, cache={"block_size": 16, "enable_prefix_caching": caching})
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i, ignore_eos=True) for i in range(3)]
    got, shared = forked(engine, params)
    assert shared == [32, 32]  # two full blocks shared; each fork computes the 13 tokens of the last one
    want = [engine.generate([PROMPT], p)[0].output_token_ids for p in params]
    assert list(got.values()) == want
    assert len({tuple(w) for w in want}) == 3  # the seeds make three different samples


def test_greedy_forks_equal_hf_and_aborting_any_of_them_frees_its_blocks(make_engine, tiny_model_dir, tiny_hf):
    engine = make_engine(tiny_model_dir, cache={"block_size": 16, "enable_prefix_caching": False})
    bm = engine.block_manager
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    got, _ = forked(engine, [greedy, greedy])
    assert got["r0"] == got["r1"] == hf_greedy(tiny_hf, PROMPT, 10)
    assert bm.num_free_blocks == bm.num_blocks
    # the parent aborted first, then a fork mid-decode, then the last: the shared blocks go with the last one
    engine.add_request("p", PROMPT, greedy)
    engine.step()
    for i in range(2):
        engine.add_request(f"c{i}", PROMPT, greedy, fork_of="p")
    engine.step()
    shared = engine.seqs["c0"].block_table[:2]
    engine.abort("p")
    assert all(bm.ref_count(b) == 2 for b in shared)
    engine.step()
    engine.abort("c0")
    engine.step()
    engine.abort("c1")
    assert bm.num_free_blocks == bm.num_blocks


def test_a_fork_of_a_request_that_is_gone_prefills_its_whole_prompt(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir, cache={"block_size": 16, "enable_prefix_caching": False})
    seq = engine.add_request("alone", PROMPT, SamplingParams(max_tokens=3, temperature=0), fork_of="nobody")
    assert seq.num_forked_tokens == 0 and seq.num_computed_tokens == 0
    run(engine, ["alone"])
