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
from pdserve.engine import kernels
from pdserve.engine.config import EngineConfig
from pdserve.engine.kernels import KernelBuildError, decode_attention_kernel
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
    meta, order = case.metadata(decode_kernel)
    assert (meta.decode_groups == []) == (decode_kernel is not None)
    return case.attention(meta, order)


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
