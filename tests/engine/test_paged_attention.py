"""The paged-attention decode kernel (`engine.kernels`) against the torch path (gather + SDPA, the
oracle) and a float64 reference: shuffled block tables, ragged context lengths, GQA, head dims,
float32 and bfloat16. Then its build (cached, concurrent, a killed builder, a failing compiler) and the
backend selection with its fallback, and the engine end to end with each backend."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from pdserve.engine import kernels
from pdserve.engine.config import EngineConfig
from pdserve.engine.kernels import KernelBuildError, decode_attention_kernel
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model import LlamaModel
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import Sequence
from tests.helpers import GREEDY, prompts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernel():
    return kernels.load()


def _decode_batch(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int,
                  block_size: int = 16):
    """A paged cache of random KV and `batch` decode rows whose blocks are scattered through it."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 16, 17, 31][:batch] + [rng.randint(1, 300) for _ in range(batch - 4)]
    num_blocks = sum(-(-n // block_size) for n in lens) + 8
    kv = PagedKVCache(1, num_blocks, block_size, num_kv_heads, head_dim, dtype, CPU)
    kv.data.copy_(torch.randn(kv.data.shape, generator=gen))
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []
    for i, n in enumerate(lens):
        seq = Sequence(f"r{i}", [0] * n, SamplingParams(max_tokens=4))
        seq.num_computed_tokens = n - 1
        seq.block_table = [free.pop() for _ in range(-(-n // block_size))]
        seqs.append(seq)
    # q as the model makes it: a head slice of the [n, heads + kv_heads, hd] rotated tensor (strided rows)
    qk = torch.randn(batch, num_heads + num_kv_heads, head_dim, generator=gen).to(dtype)
    k_new = torch.randn(batch, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(batch, num_kv_heads, head_dim, generator=gen).to(dtype)
    return kv, seqs, qk[:, :num_heads], k_new, v_new


def _attention(kv: PagedKVCache, seqs: list[Sequence], q, k, v, decode_kernel) -> torch.Tensor:
    """One layer's attention for decode rows through the engine's own metadata and `_attention`."""
    engine = SimpleNamespace(block_manager=SimpleNamespace(block_size=kv.block_size), device=CPU, kv=kv,
                             decode_kernel=decode_kernel)
    plan = sorted(((s, 1) for s in seqs), key=lambda e: e[0].num_computed_tokens)
    order = [seqs.index(s) for s, _ in plan]
    meta = LLMEngine._attention_metadata(engine, plan)
    assert (meta.decode_groups == []) == (decode_kernel is not None)
    model = SimpleNamespace(scale=q.shape[-1] ** -0.5)
    out = LlamaModel._attention(model, q[order], k[order], v[order], meta, kv.k[0], kv.v[0])
    back = torch.empty_like(out)
    back[order] = out
    return back.view(q.shape)


def _reference(kv: PagedKVCache, seqs: list[Sequence], q) -> torch.Tensor:
    """float64 softmax attention over each row's KV as the cache holds it (the new token's included)."""
    group = q.shape[1] // kv.num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, seq in enumerate(seqs):
        slots = kv.slots(seq.block_table, 0, seq.num_computed_tokens + 1)
        keys = kv.k[0][slots].double().repeat_interleave(group, 1)
        values = kv.v[0][slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,thd->ht", q[i].double(), keys) * q.shape[-1] ** -0.5
        out[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch", [1, 7, 40])
def test_kernel_matches_torch_path(kernel, dtype, heads, kv_heads, head_dim, batch):
    kv, seqs, q, k, v = _decode_batch(batch, heads, kv_heads, head_dim, dtype, seed=batch * 1000 + head_dim + heads)
    ours = _attention(kv, seqs, q, k, v, kernel)
    oracle = _attention(kv, seqs, q, k, v, None)
    exact = _reference(kv, seqs, q)  # after both wrote the new tokens' KV (the same values)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.double(), exact, atol=tol, rtol=0)
    torch.testing.assert_close(ours, oracle, atol=tol, rtol=0)
    assert ours.dtype == dtype


@pytest.mark.parametrize("head_dim", [16, 80])
def test_other_head_dims(kernel, head_dim):
    kv, seqs, q, k, v = _decode_batch(9, 6, 2, head_dim, torch.float32, seed=head_dim, block_size=5)
    torch.testing.assert_close(_attention(kv, seqs, q, k, v, kernel).double(), _reference(kv, seqs, q),
                               atol=2e-6, rtol=0)


def test_kernel_checks_its_inputs(kernel):
    kv, seqs, q, _, _ = _decode_batch(4, 4, 2, 64, torch.float32, seed=0)
    tables = torch.zeros(4, 20, dtype=torch.int32)
    lens = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    out = torch.empty(q.shape)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(out, q, kv.k[0], kv.v[0], tables - 1, lens, kv.block_size, 0.1)
    with pytest.raises(RuntimeError, match="context length"):
        kernel(out, q, kv.k[0], kv.v[0], tables, lens - 1, kv.block_size, 0.1)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel(out, q.double(), kv.k[0], kv.v[0], tables, lens, kv.block_size, 0.1)


def test_one_openmp_runtime(kernel):
    """The kernel's at::parallel_for runs on torch's OpenMP pool: no second libgomp in the process."""
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp


# -- building ---------------------------------------------------------------------------------------------
TRIVIAL = "extern \"C\" int pdserve_test_answer() { return 42; }\n"


def test_concurrent_first_build_compiles_once(tmp_path):
    """Processes that need the same library at once (Ray workers starting together): one compiles, the
    rest wait on the lock and load its result; one that held the lock and was killed blocks no one."""
    source = tmp_path / "trivial.cpp"
    source.write_text(TRIVIAL)
    root = tmp_path / "root"
    lock_dir = root / kernels.build_key(source)
    lock_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(lock_dir / "build.lock")!r}, "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)""")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pdserve.engine.kernels import build
        lib, seconds = build(Path({str(root)!r}), Path({str(source)!r}))
        print(lib, seconds > 0)""")
    builders = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
                for _ in range(3)]
    holder.kill()  # dies holding the lock: the kernel releases a flock with its process
    holder.wait()
    results = [b.communicate(timeout=120)[0].split() for b in builders]
    assert all(b.returncode == 0 for b in builders)
    assert len({lib for lib, _ in results}) == 1
    assert sorted(built for _, built in results) == ["False", "False", "True"]
    assert [p.name for p in lock_dir.iterdir() if p.suffix == ".so" or p.name.endswith(".tmp")] == \
        [f"pdserve_{source.stem}.so"]


def test_build_is_keyed_by_source_and_compiler(tmp_path):
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text(TRIVIAL)
    b.write_text(TRIVIAL + "// changed\n")
    assert kernels.build_key(a) != kernels.build_key(b)
    assert kernels.build_key(a) != kernels.build_key(a, compiler="clang++")
    lib, seconds = kernels.build(tmp_path, a)
    assert seconds > 0 and lib.parent.name == kernels.build_key(a)
    assert kernels.build(tmp_path, a) == (lib, 0.0)


def test_compile_error_is_a_build_error(tmp_path):
    source = tmp_path / "broken.cpp"
    source.write_text("#error deliberately broken\n")
    with pytest.raises(KernelBuildError, match="deliberately broken"):
        kernels.build(tmp_path, source)
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))


def test_missing_compiler_falls_back_to_torch(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    missing = str(tmp_path / "no-such-c++")
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.kernels"):
        for _ in range(2):
            assert decode_attention_kernel("auto", CPU, torch.float32, tmp_path, compiler=missing) is None
    assert len(caplog.records) == 1 and "torch path" in caplog.records[0].getMessage()
    with pytest.raises(KernelBuildError):  # asked for explicitly: no silent fallback
        decode_attention_kernel("cpu_kernel", CPU, torch.float32, tmp_path, compiler=missing)


def test_backend_selection(kernel):
    assert decode_attention_kernel("torch", CPU, torch.float32) is None
    assert decode_attention_kernel("auto", CPU, torch.float32) is kernel
    assert decode_attention_kernel("auto", CPU, torch.bfloat16) is kernel
    assert decode_attention_kernel("auto", CPU, torch.float16) is None
    assert decode_attention_kernel("auto", torch.device("cuda"), torch.bfloat16) is None
    with pytest.raises(ValueError, match="cpu_kernel runs on CPU"):
        decode_attention_kernel("cpu_kernel", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="attention_backend"):
        decode_attention_kernel("flash", CPU, torch.float32)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")


# -- the engine --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu_kernel"])
def test_engine_backends_match_hf(make_engine, tiny_model_dir, hf_reference, backend):
    engine = make_engine(tiny_model_dir, engine={"attention_backend": backend},
                         scheduler={"max_prefill_chunk": 7, "max_num_batched_tokens": 12})
    assert (engine.decode_kernel is None) == (backend == "torch")
    assert [o.output_token_ids for o in engine.generate(prompts(), GREEDY)] == hf_reference


def test_engine_bf16_backends_agree(make_engine, tiny_model_dir):
    """bf16 rounds differently on each path: the two agree on most greedy tokens, not all."""
    outs = {}
    for backend in ("torch", "cpu_kernel"):
        engine = make_engine(tiny_model_dir, engine={"attention_backend": backend}, model={"dtype": "bfloat16"})
        outs[backend] = [o.output_token_ids for o in engine.generate(prompts(), GREEDY)]
    pairs = [(a, b) for x, y in zip(outs["torch"], outs["cpu_kernel"], strict=True) for a, b in zip(x, y, strict=True)]
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)
