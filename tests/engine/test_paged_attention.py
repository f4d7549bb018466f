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

import pytest
import torch

from pdserve.bench.attention import DecodeCase
from pdserve.engine import attention, kernels
from pdserve.engine.attention import TorchBackend, make_backend
from pdserve.engine.config import EngineConfig
from pdserve.engine.kernels import KernelBuildError
from tests.helpers import GREEDY, prompts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernel():
    return kernels.load()


def _decode_case(batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int,
                 block_size: int = 16) -> DecodeCase:
    """`batch` rows with lengths 1, 16, 17, 31 (block edges) then random ones, scattered through the pool."""
    rng = random.Random(seed)
    lens = [1, 16, 17, 31][:batch] + [rng.randint(1, 300) for _ in range(batch - 4)]
    return DecodeCase(lens, heads, kv_heads, head_dim, dtype, seed, block_size)


def _attention(case: DecodeCase, decode_kernel) -> torch.Tensor:
    backend = case.backend(decode_kernel)
    meta, order = case.metadata(backend)
    assert (meta.decode_groups == []) == (decode_kernel is not None)
    return case.attention(backend, meta, order)


def _reference(case: DecodeCase) -> torch.Tensor:
    """float64 softmax attention over each row's KV as the cache holds it (the new token's included)."""
    kv, q = case.kv, case.q
    group = q.shape[1] // kv.num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, seq in enumerate(case.seqs):
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
    case = _decode_case(batch, heads, kv_heads, head_dim, dtype, seed=batch * 1000 + head_dim + heads)
    ours = _attention(case, kernel)
    oracle = _attention(case, None)
    exact = _reference(case)  # after both wrote the new tokens' KV (the same values)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.double(), exact, atol=tol, rtol=0)
    torch.testing.assert_close(ours, oracle, atol=tol, rtol=0)
    assert ours.dtype == dtype


@pytest.mark.parametrize("head_dim", [16, 80])
def test_other_head_dims(kernel, head_dim):
    case = _decode_case(9, 6, 2, head_dim, torch.float32, seed=head_dim, block_size=5)
    torch.testing.assert_close(_attention(case, kernel).double(), _reference(case), atol=2e-6, rtol=0)


# -- the prefill kernel ----------------------------------------------------------------------------------
PREFILL_SUPPORTED = torch.ops.pdserve.paged_prefill_attention_supported if kernels.load() else None


def _prefill_case(chunks: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block_size: int,
                  seed: int):
    """Prefill chunks (query rows, context length with them) over random bf16 KV scattered through a shuffled
    pool; q a head slice of a wider qkv tensor, as the model passes it."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    nblk = [-(-ctx // block_size) for _, ctx in chunks]
    pool = list(range(sum(nblk) + 3))
    rng.shuffle(pool)
    k_cache = torch.randn(len(pool) * block_size, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(len(pool) * block_size, kv_heads, head_dim, generator=gen).bfloat16()
    tables, used = [], 0
    for k in nblk:
        tables.append(pool[used:used + k] + [0] * (max(nblk) - k))
        used += k
    rows = sum(n for n, _ in chunks)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen).bfloat16()
    q = qkv[:, :heads * head_dim].view(rows, heads, head_dim)
    starts = [0]
    for n, _ in chunks:
        starts.append(starts[-1] + n)
    return (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
            torch.tensor([ctx for _, ctx in chunks], dtype=torch.int32), block_size)


def _prefill_reference(q, k_cache, v_cache, tables, starts, lens, block_size) -> torch.Tensor:
    """float64 causal attention: row i of a chunk of n rows with context c sits at position c - n + i."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s in range(len(lens)):
        c, q0, q1 = int(lens[s]), int(starts[s]), int(starts[s + 1])
        pos = torch.arange(c)
        slots = tables[s][pos // block_size].long() * block_size + pos % block_size
        keys = k_cache[slots].double().repeat_interleave(group, 1)
        values = v_cache[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,thd->hqt", q[q0:q1].double(), keys) * q.shape[-1] ** -0.5
        visible = pos[None, :] <= torch.arange(c - (q1 - q0), c)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q0:q1] = torch.einsum("hqt,thd->qhd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (4, 2, 16), (8, 1, 32)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_prefill_kernel_matches_reference(kernel, heads, kv_heads, head_dim, block_size):
    """Whole prompts, chunks after cached context (a prefix hit, a later chunk), one-row chunks, lengths at
    the edges of the kernel's 64-row tiles and 64-key steps, all in one call."""
    chunks = [(5, 5), (1, 37), (17, 17), (3, 50), (40, 100), (64, 64), (65, 65), (16, 129), (31, 200), (100, 1000)]
    case = _prefill_case(chunks, heads, kv_heads, head_dim, block_size, seed=head_dim + block_size)
    q = case[0]
    out = torch.empty_like(q)
    if not PREFILL_SUPPORTED(torch.bfloat16, head_dim, heads // kv_heads):
        with pytest.raises(RuntimeError, match="does not run"):
            torch.ops.pdserve.paged_prefill_attention(out, *case, head_dim ** -0.5)
        return
    torch.ops.pdserve.paged_prefill_attention(out, *case, head_dim ** -0.5)
    # bf16 output (and bf16 probabilities times V, as HF's bf16 attention rounds them)
    torch.testing.assert_close(out.double(), _prefill_reference(*case), atol=3e-2, rtol=0)


def test_prefill_kernel_checks_its_inputs(kernel):
    q, k_cache, v_cache, tables, starts, lens, bs = _prefill_case([(4, 10)], 4, 2, 16, 16, seed=1)
    out = torch.empty_like(q)
    op = torch.ops.pdserve.paged_prefill_attention
    with pytest.raises(RuntimeError):  # more query rows than context
        op(out, q, k_cache, v_cache, tables, starts, torch.tensor([3], dtype=torch.int32), bs, 0.25)
    with pytest.raises(RuntimeError):  # a block outside the cache
        op(out, q, k_cache, v_cache, torch.full_like(tables, 10_000), starts, lens, bs, 0.25)
    with pytest.raises(RuntimeError):  # rows that do not add up
        op(out, q, k_cache, v_cache, tables, torch.tensor([0, 3], dtype=torch.int32), lens, bs, 0.25)
    with pytest.raises(RuntimeError):  # fp32
        op(out.float(), q.float(), k_cache.float(), v_cache.float(), tables, starts, lens, bs, 0.25)
    assert not PREFILL_SUPPORTED(torch.float32, 64, 3)


def test_kernel_checks_its_inputs(kernel):
    case = _decode_case(4, 4, 2, 64, torch.float32, seed=0)
    kv, q = case.kv, case.q
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


def test_failed_build_is_not_retried_in_the_process(tmp_path, monkeypatch):
    """A compiler that failed is not run again for the same library in this process: a worker asks for the
    library twice while it starts (the GEMM, then the attention backend), and each failing try costs seconds."""
    monkeypatch.setattr(kernels, "_failed", {})
    calls = tmp_path / "calls"
    compiler = tmp_path / "failing-c++"
    compiler.write_text(f"#!/bin/sh\necho run >> {calls}\necho 'no compiler here' >&2\nexit 1\n")
    compiler.chmod(0o755)
    source = tmp_path / "trivial.cpp"
    source.write_text(TRIVIAL)
    for _ in range(3):
        with pytest.raises(KernelBuildError, match="no compiler here"):
            kernels.load(tmp_path / "root", source, compiler=str(compiler))
    assert calls.read_text().split() == ["run"]


def _backend(name: str, device=CPU, dtype=torch.float32, **kwargs):
    return make_backend(name, num_heads=6, num_kv_heads=2, head_dim=16, block_size=4, device=device, dtype=dtype,
                        **kwargs)


def test_missing_compiler_falls_back_to_torch(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    missing = str(tmp_path / "no-such-c++")
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.attention"):
        for _ in range(2):
            backend = _backend("auto", kernel_build_root=tmp_path, compiler=missing)
            assert type(backend) is TorchBackend
    assert len(caplog.records) == 1 and "torch path" in caplog.records[0].getMessage()
    with pytest.raises(KernelBuildError):  # asked for explicitly: no silent fallback
        _backend("cpu_kernel", kernel_build_root=tmp_path, compiler=missing)


def test_backend_selection(kernel, monkeypatch):
    assert _backend("torch").name == "torch"
    for dtype in (torch.float32, torch.bfloat16):
        chosen = _backend("auto", dtype=dtype)
        assert chosen.name == "cpu_kernel" and chosen.decode_kernel is kernel
        assert (chosen.fused_ops is not None) == (dtype == torch.bfloat16)
    assert _backend("auto", dtype=torch.float16).name == "torch"
    # the heads a backend plans for are what it is given (a tensor-parallel rank's share), not the model's
    local = make_backend("torch", num_heads=3, num_kv_heads=1, head_dim=16, block_size=4, device=CPU,
                         dtype=torch.float32)
    assert (local.num_heads, local.num_kv_heads) == (3, 1)
    with pytest.raises(ValueError, match="do not split"):
        make_backend("torch", num_heads=3, num_kv_heads=2, head_dim=16, block_size=4, device=CPU, dtype=torch.float32)
    cuda = torch.device("cuda")  # a device object only: nothing is allocated on it
    with pytest.raises(ValueError, match="cpu_kernel runs on CPU"):
        _backend("cpu_kernel", device=cuda, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="flashinfer runs on CUDA"):
        _backend("flashinfer")
    monkeypatch.setattr(attention, "flashinfer_importable", lambda: False)  # as on a CUDA host without the extra
    assert _backend("auto", device=cuda, dtype=torch.bfloat16).name == "torch"
    with pytest.raises(ValueError, match="attention_backend"):
        _backend("flash")
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")


# -- the engine --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu_kernel"])
def test_engine_backends_match_hf(make_engine, tiny_model_dir, hf_reference, backend):
    engine = make_engine(tiny_model_dir, engine={"attention_backend": backend},
                         scheduler={"max_prefill_chunk": 7, "max_num_batched_tokens": 12})
    assert engine.attention.name == backend
    assert [o.output_token_ids for o in engine.generate(prompts(), GREEDY)] == hf_reference


def test_engine_bf16_backends_agree(make_engine, tiny_model_dir):
    """bf16 rounds differently on each path: the two agree on most greedy tokens, not all. The kernels'
    run covers the prefill kernel too where the CPU has it, with chunks after earlier context."""
    outs = {}
    for backend in ("torch", "cpu_kernel"):
        engine = make_engine(tiny_model_dir, engine={"attention_backend": backend}, model={"dtype": "bfloat16"},
                             scheduler={"max_prefill_chunk": 7, "max_num_batched_tokens": 12})
        arch = engine.arch
        expect_prefill = backend == "cpu_kernel" and torch.ops.pdserve.paged_prefill_attention_supported(
            torch.bfloat16, arch.head_dim, arch.num_heads // arch.num_kv_heads)
        assert (getattr(engine.attention, "prefill_kernel", None) is not None) == expect_prefill
        outs[backend] = [o.output_token_ids for o in engine.generate(prompts(), GREEDY)]
    pairs = [(a, b) for x, y in zip(outs["torch"], outs["cpu_kernel"], strict=True) for a, b in zip(x, y, strict=True)]
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)
