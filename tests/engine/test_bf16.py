"""bf16 on the CPU: the packed oneDNN linear, the `auto` dtype, and the engine against HF in bf16.

Only float32 is token-exact against HF (the other engine tests pin it); in bf16 the engine must compute
the same function as HF's bf16 model up to rounding, and the served paths must agree with each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.llm_engine import pick_dtype
from pdserve.engine.model import Linear, mkldnn_bf16_linear_available
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
