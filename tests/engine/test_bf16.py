"""bf16 on the CPU: the packed oneDNN linear, the `auto` dtype, and the engine against HF in bf16.

Only float32 is token-exact against HF (the other engine tests pin it); in bf16 the engine must compute
the same function as HF's bf16 model up to rounding, and the served paths must agree with each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine import kernels
from pdserve.engine.llm_engine import pick_dtype
from pdserve.engine.model import Linear, mkldnn_bf16_linear_available, tile_bf16_weight
from pdserve.engine.platform import cpu_has_fast_bf16
from pdserve.engine.sampling import SamplingParams
from tests.helpers import prompts


@pytest.mark.parametrize("rows", [0, 1, 3, 32, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_bf16_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16() if bias else None
    lin = Linear(w, b, parts=2)
    assert (lin.packed is not None) == mkldnn_bf16_linear_available()
    x = torch.randn(rows, 80, generator=g).bfloat16()[:, :64]  # a strided view, as the q/k/v slices are
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = lin(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), want, atol=0.25, rtol=0.02)


def test_packed_head_keeps_its_own_embedding_table():
    w = torch.randn(40, 16).bfloat16()
    lin = Linear(w, None, parts=2)
    ids = torch.tensor([0, 7, 39])
    if lin.packed is None:
        assert torch.equal(lin.rows(ids), w[ids])
    else:
        assert lin.rows(ids) is None  # opaque layout: the model keeps the table (see LlamaModel.__init__)


@pytest.fixture(scope="module")
def ops():
    kernels.load()
    return torch.ops.pdserve


@pytest.mark.parametrize("rows", [0, 1, 3, 8, 9, 70])
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 1), (31, 7), (32, 64), (100, 65), (96, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_tiled_bf16_linear_against_float64(ops, rows, out_features, in_features, bias):
    """`torch.ops.pdserve.bf16_linear` (the CPU model's bf16 GEMM where the kernels are built for
    AVX-512-BF16): fp32 sums of exact bf16 products, rounded once, so within one bf16 rounding of the float64
    product, for ragged tiles (outputs not a multiple of 32, an odd input width, rows past one tile of 8)."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, in_features + 3, generator=g).bfloat16()[:, :in_features]  # a strided view
    lin = Linear(w, b, parts=2, linear_ops=ops if ops.bf16_linear_supported() else None)
    if not ops.bf16_linear_supported():  # an AVX2-only CPU: the oneDNN/parts paths, and the op refuses
        assert lin.tiled is None
        with pytest.raises(RuntimeError, match="AVX-512-BF16"):
            ops.bf16_linear(torch.empty(rows, out_features, dtype=torch.bfloat16), x.contiguous(),
                            tile_bf16_weight(w), None)
        return
    assert lin.tiled is not None and lin.tiled.shape == (-(-out_features // 32), -(-in_features // 2), 32, 2)
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    got = lin(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=2 ** -8)  # half a bf16 ulp, and fp32 sum order
    assert torch.equal(lin.rows(torch.arange(out_features)), w)  # a tied head serves as the embedding table


def test_tiled_bf16_linear_refuses_a_mismatched_weight(ops):
    x = torch.randn(2, 64).bfloat16()
    # an AVX2-only build refuses every call, first
    with pytest.raises(RuntimeError, match=r"tiled weight must be" if ops.bf16_linear_supported() else "AVX-512-BF16"):
        ops.bf16_linear(torch.empty(2, 40, dtype=torch.bfloat16), x, tile_bf16_weight(torch.randn(32, 64).bfloat16()),
                        None)
    with pytest.raises(RuntimeError, match="bias" if ops.bf16_linear_supported() else "AVX-512-BF16"):
        ops.bf16_linear(torch.empty(2, 32, dtype=torch.bfloat16), x, tile_bf16_weight(torch.randn(32, 64).bfloat16()),
                        torch.zeros(32, dtype=torch.bfloat16))


def test_auto_dtype_is_bf16_exactly_where_the_cpu_has_native_bf16():
    want = torch.bfloat16 if cpu_has_fast_bf16() and mkldnn_bf16_linear_available() else torch.float32
    assert pick_dtype("auto", torch.device("cpu")) == want
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_bf16_logits_match_hf_in_bf16(make_engine, tiny_model_dir, tmp_path, model):
    """One packed prefill of several prompts: every prompt's last-token logits are HF bf16's, up to bf16
    rounding (the Qwen2-style model has QKV biases and a tied head: the separate embedding table)."""
    from transformers import AutoModelForCausalLM

    from pdserve.engine.tiny_models import save_tiny_model

    path = tiny_model_dir if model == "llama" else save_tiny_model(tmp_path / "qwen2", model_type="qwen2")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    e = make_engine(path, model={"dtype": "bfloat16"})
    assert e.dtype == torch.bfloat16 and e.kv.data.dtype == torch.bfloat16
    ps = prompts(3)
    seqs = [e.add_request(f"r{i}", p, SamplingParams(max_tokens=2, temperature=0)) for i, p in enumerate(ps)]
    for s in seqs:
        e.block_manager.grow(s.block_table, s.num_tokens)
    sampled, logits = e.forward([(s, s.num_tokens) for s in seqs])
    for s, got in zip(sampled, logits, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([s.prompt_token_ids])).logits[0, -1].float()
        torch.testing.assert_close(got, want, atol=0.1 * float(want.abs().max()), rtol=0.05)
    for s in seqs:
        e.abort(s.request_id)


def test_bf16_generation_runs_to_completion_without_leaks(make_engine, tiny_model_dir):
    e = make_engine(tiny_model_dir, model={"dtype": "bfloat16"}, cache={"num_kv_blocks": 24, "block_size": 4})
    outs = e.generate(prompts(5), SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [len(o.output_token_ids) for o in outs] == [16] * len(outs)
