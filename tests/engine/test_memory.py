"""Memory: the KV cache's size (the arithmetic with given numbers, the CPU rule, the profiling pass run on
CPU through the real forward and leaving no trace, and on CUDA sized from the device: `gpu`), and weights
loaded one tensor at a time (the reader against safetensors' own, and the default model's peak RSS in a
fresh process, `slow`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from pdserve.engine.config import CacheConfig
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.memory import KVCacheTooSmall, kv_cache_blocks
from pdserve.engine.model_source import iter_safetensors
from tests.helpers import GREEDY, prompts

GIB, MIB = 2**30, 2**20


def test_kv_blocks_are_what_the_utilization_leaves_beside_the_peak():
    # 80 GiB x 0.9 = 72 GiB; the peak uses 20 GiB: 52 GiB of 2 MiB blocks
    assert kv_cache_blocks(80 * GIB, 0.9, 20 * GIB, 2 * MIB) == 52 * 512
    # a remainder under one block is left unused
    assert kv_cache_blocks(10 * GIB, 1.0, 10 * GIB - 3 * MIB, 2 * MIB) == 1


def test_no_room_for_one_block_is_a_typed_error_saying_how_much_is_missing():
    with pytest.raises(KVCacheTooSmall, match="--gpu-memory-utilization") as e:
        kv_cache_blocks(8 * GIB, 0.5, 4 * GIB - MIB, 2 * MIB)  # 1 MiB left, a block needs 2
    assert e.value.missing_bytes == MIB
    with pytest.raises(KVCacheTooSmall) as e:
        kv_cache_blocks(8 * GIB, 0.5, 5 * GIB, 2 * MIB)  # over budget already
    assert e.value.missing_bytes == GIB + 2 * MIB


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_utilization_is_bounded(bad):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=bad)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache_blocks(GIB, bad, 0, MIB)


def test_cpu_pool_is_sized_by_kv_cache_memory_gb_and_num_kv_blocks_wins(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir, cache={"num_kv_blocks": None, "kv_cache_memory_gb": 0.001})
    a = engine.arch
    per_block = PagedKVCache.bytes_per_block(a.num_layers, 16, a.num_kv_heads, a.head_dim, engine.dtype)
    assert engine.block_manager.num_blocks == int(0.001 * GIB) // per_block
    engine = make_engine(tiny_model_dir, cache={"num_kv_blocks": 37, "gpu_memory_utilization": 0.1})
    assert engine.block_manager.num_blocks == 37


def test_profiling_pass_runs_the_largest_step_and_leaves_no_trace(make_engine, tiny_model_dir):
    # 300 tokens in sequences of at most max_model_len (128): 128 + 128 + 44, 8 + 8 + 3 blocks of 16
    engine = make_engine(tiny_model_dir, model={"max_model_len": 128},
                         scheduler={"max_num_batched_tokens": 300, "max_num_seqs": 4})
    before = [o.output_token_ids for o in engine.generate(prompts(), GREEDY)]
    kv, blocks = engine.kv, engine.block_manager
    used = engine.profile_step()
    a = engine.arch
    assert used == 19 * PagedKVCache.bytes_per_block(a.num_layers, 16, a.num_kv_heads, a.head_dim, engine.dtype)
    assert engine.kv is kv and engine.block_manager is blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    assert [o.output_token_ids for o in engine.generate(prompts(), GREEDY)] == before


def test_weights_are_read_one_at_a_time_as_safetensors_stores_them(tiny_model_dir):
    from safetensors.torch import load_file

    files = sorted(tiny_model_dir.glob("*.safetensors"))
    expected = {k: v for f in files for k, v in load_file(f).items()}
    got = {}
    for name, t in iter_safetensors(files):
        assert name not in got
        got[name] = t.clone()
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_a_truncated_weights_file_is_refused(tiny_model_dir, tmp_path):
    data = next(tiny_model_dir.glob("*.safetensors")).read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="outside the file"):
        list(iter_safetensors([bad]))
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        list(iter_safetensors([bad]))


_PEAK = textwrap.dedent("""
    import sys, torch
    import transformers.models.llama.modeling_llama  # imported by load_model: not part of the load's peak
    from pathlib import Path
    from pdserve.engine.model import load_model

    def status(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    base = status("VmRSS:")
    model, _ = load_model(Path(sys.argv[1]), torch.device("cpu"), torch.float32)
    print(status("VmHWM:") - base)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_the_default_model_peaks_near_its_own_size(default_model_dir):
    """float32 SmolLM2-135M is 513 MiB; loading it through a mapped file and a second laid-out copy peaked at
    1081 MiB over the process's size before (2.1x), one tensor at a time 678 MiB (1.3x)."""
    weights = sum(t.numel() * 4 for _, t in iter_safetensors(sorted(default_model_dir.glob("*.safetensors"))))
    out = subprocess.run([sys.executable, "-c", _PEAK, str(default_model_dir)], capture_output=True, text=True,
                         check=True, timeout=300)
    peak = int(out.stdout.split()[-1])
    assert peak < 1.5 * weights, f"loading peaked at {peak / MIB:.0f} MiB over the process, weights {weights / MIB:.0f}"


@pytest.mark.gpu
def test_cuda_pool_fills_what_the_utilization_leaves(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir, model={"device": "cuda"}, cache={"num_kv_blocks": None,
                                                                          "gpu_memory_utilization": 0.5})
    free, total = torch.cuda.mem_get_info()
    per_block = engine.kv.data[:, :, :1].numel() * engine.kv.data.element_size()
    assert engine.block_manager.num_blocks > 1000  # a tiny model on a GPU: gigabytes of KV
    assert total - free <= 0.5 * total + per_block + 512 * MIB  # within the fraction (allocator rounding aside)
    out = engine.generate(prompts(), GREEDY)
    assert all(len(o.output_token_ids) == GREEDY.max_tokens for o in out)


@pytest.mark.gpu
def test_cuda_utilization_too_small_for_one_block_is_refused(make_engine, tiny_model_dir):
    with pytest.raises(KVCacheTooSmall, match="missing|more than is left"):
        make_engine(tiny_model_dir, model={"device": "cuda"}, cache={"num_kv_blocks": None,
                                                                     "gpu_memory_utilization": 0.0001})
