"""The fused bf16 ops of `engine.kernels` (`torch.ops.pdserve`: RMSNorm, residual add + RMSNorm, RoPE +
the KV-cache write, SiLU * up) against the chains of torch ops they replace, HF's bf16 modules written
out: equal bit for bit (RMSNorm up to the order of one fp32 sum), on the rows of a decode step (the
calling thread) and of a prefill (the pool). Then the model end to end: the fused forward and the torch
chain give the same greedy tokens on the tiny model in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine import kernels
from pdserve.engine.sampling import SamplingParams
from tests.helpers import prompts


@pytest.fixture(scope="module")
def ops():
    kernels.load()
    return torch.ops.pdserve


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


ROWS = [1, 5, 32, 300]  # one decode token ... a prefill chunk (run on the thread pool)


@pytest.mark.parametrize("n", ROWS)
def test_rms_norm_and_residual_add(ops, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, 576, generator=g) * 3).bfloat16()
    delta = torch.randn(n, 576, generator=g).bfloat16()
    w = torch.randn(576, generator=g).bfloat16()
    out = torch.empty_like(x)
    ops.rms_norm(out, x, w, 1e-5)
    _same_up_to_sum_order(out, _hf_rms_norm(x, w, 1e-5))
    y = x.clone()
    ops.add_rms_norm(y, delta, w, out, 1e-5)
    assert torch.equal(y, x + delta)  # the residual stream, updated in place
    _same_up_to_sum_order(out, _hf_rms_norm(x + delta, w, 1e-5))


def _same_up_to_sum_order(got: torch.Tensor, want: torch.Tensor) -> None:
    """An fp32 sum of squares in another order moves the scale by an ulp or so: rarely a bf16 ulp or two apart."""
    assert (got != want).float().mean() < 1e-3
    torch.testing.assert_close(got, want, atol=0, rtol=2 ** -6)  # two roundings: an ulp in, up to two out


@pytest.mark.parametrize("n", ROWS)
def test_silu_mul(ops, n):
    gu = (torch.randn(n, 2 * 1536, generator=torch.Generator().manual_seed(n)) * 4).bfloat16()
    out = torch.empty(n, 1536, dtype=torch.bfloat16)
    ops.silu_mul(out, gu)
    g, u = gu.chunk(2, dim=-1)
    assert torch.equal(out, F.silu(g) * u)


@pytest.mark.parametrize("n", ROWS)
def test_rope_writes_q_and_k_in_place_and_k_v_into_their_slots(ops, n):
    nh, kvh, hd = 9, 3, 64
    g = torch.Generator().manual_seed(n)
    qkv = torch.randn(n, (nh + 2 * kvh) * hd, generator=g).bfloat16()
    positions = torch.randint(0, 2048, (n,), generator=g)
    inv = 1.0 / (100000 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.outer(torch.arange(4096).float(), inv)] * 2, dim=-1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    k_cache = torch.zeros(1024, kvh, hd, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(1024, generator=g)[:n]
    got = qkv.clone()
    ops.rope_kv_cache(got, positions, cos, sin, nh, kvh, k_cache, v_cache, slots)
    qk = qkv[:, : (nh + kvh) * hd].view(n, nh + kvh, hd)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    want = qk * c + _rotate_half(qk) * s
    assert torch.equal(got[:, : (nh + kvh) * hd].view(n, nh + kvh, hd), want)
    assert torch.equal(k_cache[slots], want[:, nh:])
    assert torch.equal(v_cache[slots], qkv[:, (nh + kvh) * hd:].view(n, kvh, hd))
    untouched = torch.ones(1024, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def test_rope_refuses_a_slot_outside_the_cache(ops):
    qkv = torch.zeros(1, 5 * 64, dtype=torch.bfloat16)
    table = torch.zeros(16, 64, dtype=torch.bfloat16)
    cache = torch.zeros(8, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rope_kv_cache(qkv, torch.tensor([0]), table, table, 3, 1, cache, cache.clone(), torch.tensor([8]))


def test_fused_forward_and_the_torch_chain_agree(make_engine, tiny_model_dir):
    """The same engine, the same prompts, with and without the fused ops: the same greedy tokens."""
    e = make_engine(tiny_model_dir, model={"dtype": "bfloat16"}, engine={"attention_backend": "cpu_kernel"})
    assert e.model.fused is not None
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    fused = [o.output_token_ids for o in e.generate(prompts(4), params)]
    e.model.fused = None
    e.block_manager.reset_prefix_cache()  # compute everything again, through the chain
    chain = [o.output_token_ids for o in e.generate(prompts(4), params)]
    assert fused == chain
