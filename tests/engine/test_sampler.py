"""The sampling controls (logit_bias, min_tokens, presence, frequency and repetition penalties, min_p)
against plain per-row reference implementations that loop over the vocabulary, on random logits; and in
the engine on the tiny model: applied on every row, read from the whole token history (a resumed request
continues as an uninterrupted one), and refused out of range."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from pdserve.engine.llm_engine import InvalidRequestError
from pdserve.engine.sampler import filter_logits, filter_rows, process_logits, sample, sample_tokens
from pdserve.engine.sampling import (
    MAX_LOGIT_BIAS_ENTRIES,
    InvalidSamplingParams,
    SamplingParams,
)
from pdserve.engine.sequence import Sequence

VOCAB = 48
EOS = frozenset({3})


def reference(row: list[float], s: Sequence, eos: frozenset[int]) -> list[float]:
    """One row, the obvious way: a loop over the vocabulary (vLLM's order and semantics)."""
    p = s.params
    x = list(row)
    for t, b in p.logit_bias.items():
        x[t] += b
    if len(s.output_token_ids) < p.min_tokens:
        for t in p.stop_token_set | eos:
            x[t] = -math.inf
    out = Counter(s.output_token_ids)
    seen = set(s.prompt_token_ids) | set(s.output_token_ids)
    for v in range(len(x)):
        if v in seen and p.repetition_penalty != 1.0:
            x[v] = x[v] / p.repetition_penalty if x[v] > 0 else x[v] * p.repetition_penalty
        x[v] -= p.frequency_penalty * out[v] + p.presence_penalty * (1 if out[v] else 0)
    return x


def random_params(rng: random.Random, i: int) -> SamplingParams:
    kw = {}
    if i % 5 == 1 or rng.random() < 0.3:
        kw["presence_penalty"] = rng.uniform(-2, 2)
    if i % 5 == 2 or rng.random() < 0.3:
        kw["frequency_penalty"] = rng.uniform(-2, 2)
    if i % 5 == 3 or rng.random() < 0.3:
        kw["repetition_penalty"] = rng.choice([0.5, 1.3, 2.0])
    if i % 5 == 4 or rng.random() < 0.3:
        kw["logit_bias"] = {rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(rng.randrange(1, 6))}
    if rng.random() < 0.3:
        kw["min_tokens"] = rng.randrange(1, 8)
        kw["stop_token_ids"] = [rng.randrange(VOCAB)]
    return SamplingParams(max_tokens=16, **kw)  # i % 5 == 0 and no luck: a row that uses none


@pytest.mark.parametrize("seed", range(6))
def test_the_controls_match_a_per_row_reference_on_random_logits(seed):
    rng = random.Random(seed)
    seqs = []
    for i in range(12):
        s = Sequence(f"r{i}", [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))], random_params(rng, i))
        s.output_token_ids = [rng.randrange(VOCAB // 4) for _ in range(rng.randrange(0, 12))]  # repeats
        seqs.append(s)
    logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(seed)) * 5
    want = torch.tensor([reference(row, s, EOS) for row, s in zip(logits.tolist(), seqs, strict=True)])
    got = process_logits(logits.clone(), seqs, EOS)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(want)], want[~torch.isinf(want)], atol=1e-5)
    # every control did something somewhere (the test cannot pass by applying none)
    assert (got != logits).any(dim=1).sum() >= 8


def test_a_batch_using_no_control_is_left_untouched():
    seqs = [Sequence(f"r{i}", [1, 2, 2], SamplingParams()) for i in range(4)]
    for s in seqs:
        s.output_token_ids = [2, 2, 5]
    logits = torch.randn(4, VOCAB)
    assert torch.equal(process_logits(logits.clone(), seqs, EOS), logits)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_keeps_exactly_the_tokens_at_least_min_p_times_as_likely_as_the_top_one(min_p):
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * 3
    p = SamplingParams(temperature=0.7, min_p=min_p)
    probs = (logits / 0.7).softmax(-1).tolist()
    want = [pr >= min_p * max(probs) for pr in probs]
    assert torch.isfinite(filter_logits(logits, p)).tolist() == want


@pytest.mark.parametrize("seed", range(3))
def test_batched_sampling_is_the_per_row_reference(seed):
    """`filter_rows` equals `filter_logits` row by row, and `sample_tokens` draws from each row's generator what
    `torch.multinomial` draws (its one-sample path), with no host sync of its own."""
    rng = random.Random(seed)
    params = [SamplingParams(temperature=rng.choice([0.5, 1.0, 1.7]), top_k=rng.choice([0, 1, 5, VOCAB + 3]),
                             top_p=rng.choice([1.0, 0.9, 0.3]), min_p=rng.choice([0.0, 0.05, 0.2]))
              for _ in range(9)] + [SamplingParams(temperature=0)]
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(seed)) * 4
    want = torch.stack([filter_logits(row, p) for row, p in zip(logits, params, strict=True)])
    assert torch.equal(filter_rows(logits[:-1], params[:-1]), want[:-1])
    seeds = [rng.randrange(2**31) for _ in params]
    got = sample_tokens(logits.clone(), params, [torch.Generator().manual_seed(s) for s in seeds]).tolist()
    ref = [int(torch.multinomial(want[i].softmax(-1), 1, generator=torch.Generator().manual_seed(seeds[i])))
           for i in range(len(params) - 1)]
    assert got == [*ref, int(logits[-1].argmax())]


def test_greedy_rows_read_the_processed_logits():
    s = Sequence("r", [1], SamplingParams(temperature=0, logit_bias={9: 100.0}))
    t = Sequence("t", [1], SamplingParams(temperature=0))
    logits = torch.zeros(2, VOCAB)
    logits[:, 4] = 10
    assert sample(logits, [s, t], [torch.Generator()] * 2)[0] == [9, 4]


@pytest.mark.parametrize("kw, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 11.0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"logit_bias": {1: 101.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: math.inf}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"),  # past max_tokens=16
])
def test_out_of_range_controls_name_the_param(kw, param):
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(max_tokens=16, **kw)
    assert err.value.param == param


def test_the_engine_applies_the_controls_and_range_checks_against_its_vocabulary(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    plain = engine.generate([[5, 6, 7]], greedy)[0].output_token_ids
    forced = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, logit_bias={200: 100.0}))
    assert forced[0].output_token_ids == [200] * 8
    # the first greedy token is a stop token: min_tokens holds it off for 3 tokens
    held = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[plain[0]],
                                                        min_tokens=3))[0]
    assert held.output_token_ids[0] != plain[0] and len(held.output_token_ids) >= 3
    for p in (SamplingParams(logit_bias={256: 1.0}), SamplingParams(max_tokens=4, min_tokens=1,
                                                                    stop_token_ids=list(range(256)))):
        with pytest.raises(InvalidRequestError):
            engine.add_request("bad", [1, 2], p)


def test_penalties_read_the_whole_history_so_a_resumed_request_continues_unchanged(make_engine, tiny_model_dir):
    """A migrated request resumes with the tokens already streamed (`output_token_ids`): the penalties read
    those too, so its continuation equals the uninterrupted run's; and the penalties change the output."""
    engine = make_engine(tiny_model_dir)
    prompt = [9, 9, 4, 9, 17, 4]
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5,
                       repetition_penalty=1.8, min_tokens=6, stop_token_ids=[0])
    whole = engine.generate([prompt], p)[0].output_token_ids
    plain = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert whole != plain.output_token_ids
    engine.add_request("resumed", prompt, p, output_token_ids=whole[:5])
    rest = []
    while engine.has_unfinished():
        rest += [t for out in engine.step() for t in out.new_token_ids]
    assert whole[:5] + rest == whole


def hf_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """HF transformers' log-softmax [len(output), vocab] at each output position (float32)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1)


def test_logprobs_match_hf_log_softmax_in_fp32(make_engine, tiny_model_dir, tiny_hf):
    """Greedy and sampled rows, several prompt lengths in one batch, a row that did not ask in between."""
    engine = make_engine(tiny_model_dir)
    ps = [[5, 6, 7], list(range(40, 80)), [9] * 17]
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=5),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True, logprobs=0)]
    rids = [f"r{i}" for i in range(3)]
    for rid, p, sp in zip(rids, ps, params, strict=True):
        engine.add_request(rid, p, sp)
    got = {rid: [] for rid in rids}
    tokens = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            got[out.request_id] += out.logprobs or []
    assert got["r1"] == []
    for rid, k in (("r0", 5), ("r2", 0)):
        i = rids.index(rid)
        ref = hf_logprobs(tiny_hf, ps[i], tokens[rid])
        assert [e.token_id for e in got[rid]] == tokens[rid]
        for pos, e in enumerate(got[rid]):
            assert abs(e.logprob - ref[pos, e.token_id].item()) < 1e-4
            top_v, top_i = ref[pos].topk(k) if k else (ref[pos, :0], ref[pos, :0])
            assert [t for t, _ in e.top] == top_i.tolist()
            assert max((abs(v - w) for (_, v), w in zip(e.top, top_v.tolist(), strict=True)), default=0) < 1e-4


@pytest.mark.parametrize("chunk,caching", [(None, True), (7, True), (None, False)])
def test_prompt_logprobs_match_hf_log_softmax_in_fp32(make_engine, tiny_model_dir, tiny_hf, chunk, caching):
    """Every prompt position's logits are kept for a request that asks (completions' echo with logprobs), in a
    batch beside one that does not, across prefill chunks; a cached prefix does not cut them short."""
    engine = make_engine(tiny_model_dir, cache={"block_size": 4, "enable_prefix_caching": caching},
                         scheduler={"max_prefill_chunk": chunk, "policy": "chunked" if chunk else "continuous"})
    prompt = list(range(30, 63))
    engine.generate([prompt], SamplingParams(max_tokens=1))  # its blocks are cached now (when caching is on)
    engine.add_request("asks", prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    engine.add_request("not", [5, 6, 7, 8, 9], SamplingParams(max_tokens=2, temperature=0))
    first = {}
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, out)
    assert first["not"].prompt_logprobs is None
    got = first["asks"].prompt_logprobs
    with torch.no_grad():
        ref = torch.log_softmax(tiny_hf(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    assert [e.token_id for e in got] == prompt[1:]
    for pos, e in enumerate(got):
        assert abs(e.logprob - ref[pos, prompt[pos + 1]].item()) < 1e-4
        assert [t for t, _ in e.top] == ref[pos].topk(3).indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(e.top, ref[pos].topk(3).values.tolist(), strict=True)) < 1e-4


def test_a_seeded_request_handed_over_mid_stream_samples_what_one_engine_would(make_engine, tiny_model_dir):
    """A decode worker (or a migration's new worker) continues a seeded request from the tokens sampled elsewhere:
    its generator skips the draws they took, so the text equals an uninterrupted run's."""
    engine = make_engine(tiny_model_dir)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    whole = engine.generate([[5, 6, 7, 8]], params)[0].output_token_ids
    for cut in (1, 5):
        engine.add_request("resumed", [5, 6, 7, 8], params, output_token_ids=whole[:cut])
        rest = []
        while engine.has_unfinished():
            rest += [t for o in engine.step() for t in o.new_token_ids]
        assert whole[:cut] + rest == whole, cut
