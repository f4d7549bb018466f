"""The CUDA side of the attention seam and the decode CUDA graphs.

On CPU: the bucket arithmetic, the config's checks, and the FlashInfer backend's page-table encoding (its CSR
`indptr`/`indices`/`last_page_len` names exactly the slots `slot_ids` names, built without CUDA). Marked `gpu` (never
run where there is no CUDA device, deselected by tests/conftest.py): FlashInfer against the torch path on a mixed
decode + chunked-prefill step over a shuffled paged cache, the engine under CUDA graphs against the same engine
eager, and a step that replays a graph with padding rows leaving every real request's KV untouched."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.attention import AttentionBackend, FlashInferBackend, slot_ids
from pdserve.engine.config import EngineConfig
from pdserve.engine.cuda_graphs import bucket_for, graph_batch_sizes
from tests.helpers import GREEDY, prompts


def test_buckets():
    sizes = graph_batch_sizes((1, 2, 4, 8, 16, 32, 64), max_num_seqs=20)
    assert sizes == [1, 2, 4, 8, 16, 32]  # up to the first that holds max_num_seqs rows
    assert [bucket_for(sizes, n) for n in (1, 3, 8, 9, 20, 32, 33)] == [1, 4, 8, 16, 32, 32, None]
    assert graph_batch_sizes((4, 8), max_num_seqs=100) == [4, 8]
    for bad in ((), (0, 4), (4, 2), (2, 2)):
        with pytest.raises(ValueError, match="cuda_graph_batch_sizes"):
            EngineConfig(cuda_graph_batch_sizes=bad)


def test_flashinfer_page_tables_name_the_cache_slots():
    """The CSR page tables FlashInfer is planned with (NHD pages: our cache's [blocks, block_size, kv_heads,
    head_dim] view, K and V as a tuple, no conversion) cover each chunk's context exactly."""
    backend = FlashInferBackend.__new__(FlashInferBackend)  # the host-side planning only: no CUDA, no flashinfer
    AttentionBackend.__init__(backend, 4, 2, 16, 5, torch.device("cpu"), torch.float32)
    rng = random.Random(0)
    pool = list(range(60))
    rng.shuffle(pool)
    chunks, used = [], 0
    for start, n in [(0, 1), (4, 1), (5, 1), (9, 1), (0, 12), (10, 5), (14, 1)]:
        k = -(-(start + n) // 5)
        chunks.append((pool[used:used + k] + [99] * 2, start, n))  # tables may run past the context
        used += k
    indptr, indices, last = backend._csr(chunks)
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    for i, (table, start, n) in enumerate(chunks):
        pages = indices[indptr[i]:indptr[i + 1]].tolist()
        assert 1 <= last[i] <= 5
        slots = [p * 5 + o for p in pages[:-1] for o in range(5)] + [pages[-1] * 5 + o for o in range(int(last[i]))]
        assert slots == slot_ids(table, 0, start + n, 5).tolist()
    decode_slots = backend._decode_slots(chunks[:4])
    assert decode_slots.tolist() == [slot_ids(t, s, s + 1, 5).item() for t, s, _ in chunks[:4]]


# -- CUDA only: never run on the machines this was written on ------------------------------------------------
CUDA = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 8, 128), (32, 8, 128)])
def test_flashinfer_matches_the_torch_path(heads, kv_heads, head_dim):
    pytest.importorskip("flashinfer")
    from pdserve.engine.attention import make_backend

    bs, dtype = 16, torch.bfloat16
    rng = random.Random(heads)
    gen = torch.Generator(device=CUDA).manual_seed(heads)
    chunks_spec = [(rng.randint(1, 300), 1) for _ in range(5)] + [(0, 37), (50, 20), (16, 16)]  # (cached, new)
    nblk = [-(-(c + n) // bs) for c, n in chunks_spec]
    pool = list(range(sum(nblk) + 4))
    rng.shuffle(pool)
    chunks, used = [], 0
    for (c, n), k in zip(chunks_spec, nblk, strict=True):
        chunks.append((pool[used:used + k], c, n))
        used += k
    k_cache = torch.randn(len(pool) * bs, kv_heads, head_dim, generator=gen, device=CUDA).to(dtype)
    v_cache = torch.randn(len(pool) * bs, kv_heads, head_dim, generator=gen, device=CUDA).to(dtype)
    rows = sum(n for _, _, n in chunks)
    q = torch.randn(rows, heads, head_dim, generator=gen, device=CUDA).to(dtype)
    k = torch.randn(rows, kv_heads, head_dim, generator=gen, device=CUDA).to(dtype)
    v = torch.randn(rows, kv_heads, head_dim, generator=gen, device=CUDA).to(dtype)
    outs = {}
    for name in ("torch", "flashinfer"):
        backend = make_backend(name, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=bs,
                               device=CUDA, dtype=dtype, max_blocks_per_seq=64)
        meta = backend.metadata(chunks, num_decode=5)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        outs[name] = backend.forward(q, k, v, meta, k_cache, v_cache).float()
    torch.testing.assert_close(outs["flashinfer"], outs["torch"], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_engine_under_cuda_graphs_matches_eager(make_engine, tiny_model_dir):
    pytest.importorskip("flashinfer")
    outs, engines = {}, {}
    for eager in (True, False):
        engine = make_engine(tiny_model_dir, model={"device": "cuda", "dtype": "bfloat16"},
                             engine={"attention_backend": "flashinfer", "enforce_eager": eager,
                                     "cuda_graph_batch_sizes": (1, 2, 4, 8)})
        engines[eager] = engine
        outs[eager] = [o.output_token_ids for o in engine.generate(prompts(), GREEDY)]
    assert engines[True].graphs is None
    graphed = engines[False]
    assert graphed.graphs is not None and graphed.graphs.replays > 0
    # padded GEMM shapes may round differently in bf16: most tokens agree, and every request's first does
    pairs = [(a, b) for x, y in zip(outs[True], outs[False], strict=True) for a, b in zip(x, y, strict=True)]
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)
    assert [x[0] for x in outs[True]] == [y[0] for y in outs[False]]


@pytest.mark.gpu
def test_padding_rows_write_only_the_padding_block(make_engine, tiny_model_dir):
    pytest.importorskip("flashinfer")
    engine = make_engine(tiny_model_dir, model={"device": "cuda", "dtype": "bfloat16"},
                         engine={"attention_backend": "flashinfer", "cuda_graph_batch_sizes": (4,)})
    pad = engine.block_manager.num_blocks
    assert engine.kv.num_blocks == pad + 1
    for i, p in enumerate(prompts()[:3]):
        engine.add_request(f"r{i}", p, GREEDY)
    while engine.has_unfinished() and engine.graphs.replays == 0:
        engine.step()
    before = engine.kv.data[:, :, :pad].clone()
    replays = engine.graphs.replays
    engine.step()  # three decode rows padded to four
    assert engine.graphs.replays == replays + 1
    changed = (engine.kv.data[:, :, :pad] != before).flatten(3).any(-1).any(0).any(0)  # per block
    tables = {b for s in engine.running for b in s.block_table}
    assert set(changed.nonzero().flatten().tolist()) <= tables
    while engine.has_unfinished():
        engine.step()
