"""`pdserve bench attention`: one layer's decode attention, the torch path (gather + SDPA) against the
paged kernel (`engine.kernels`), through the attention backends' own metadata and `forward` (`engine.attention`).

Shapes default to SmolLM2-135M's (9 heads, 3 KV heads, head_dim 64, 30 layers, blocks of 16); the
batches are scattered through a shuffled block pool. Each figure is the median of `--runs` runs of
`--reps` calls; the metadata (built once per step by the engine) is not timed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from functools import partial

import torch

from pdserve.engine.attention import AttentionBackend, AttentionMetadata, CpuKernelBackend, TorchBackend
from pdserve.engine.kernels import load
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.platform import cpu_description
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import Sequence

CPU = torch.device("cpu")


class DecodeCase:
    """Decode rows of context lengths `lens` (new token included) in a paged cache of random KV, their
    blocks shuffled through the pool; q as the model makes it (a head slice of the rotated qk tensor)."""

    def __init__(self, lens: list[int], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int,
                 block_size: int = 16):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        num_blocks = sum(-(-n // block_size) for n in lens) + 8
        self.kv = kv = PagedKVCache(1, num_blocks, block_size, kv_heads, head_dim, dtype, CPU)
        kv.data.copy_(torch.randn(kv.data.shape, generator=gen))
        free = list(range(num_blocks))
        rng.shuffle(free)
        self.seqs = []
        for i, n in enumerate(lens):
            seq = Sequence(f"r{i}", [0] * n, SamplingParams(max_tokens=4))
            seq.num_computed_tokens = n - 1
            seq.block_table = [free.pop() for _ in range(-(-n // block_size))]
            self.seqs.append(seq)
        batch = len(lens)
        self.q = torch.randn(batch, heads + kv_heads, head_dim, generator=gen).to(dtype)[:, :heads]
        self.k = torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype)
        self.v = torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype)

    def backend(self, kernel) -> AttentionBackend:
        """The cpu_kernel backend for `kernel` (the loaded op), or the torch one for None."""
        kv = self.kv
        args = (self.q.shape[1], kv.num_kv_heads, kv.head_dim, kv.block_size, CPU, kv.dtype)
        return TorchBackend(*args) if kernel is None else CpuKernelBackend(*args, decode_kernel=kernel)

    def metadata(self, backend: AttentionBackend) -> tuple[AttentionMetadata, list[int]]:
        """The backend's metadata for these rows, sorted by length as the engine sorts them, and the rows' order."""
        plan = sorted(self.seqs, key=lambda s: s.num_computed_tokens)
        meta = backend.metadata([(s.block_table, s.num_computed_tokens, 1) for s in plan], len(plan))
        return meta, [self.seqs.index(s) for s in plan]

    def attention(self, backend: AttentionBackend, meta: AttentionMetadata, order: list[int]) -> torch.Tensor:
        """One layer's attention as the model runs it: writes the new tokens' KV, then `backend.forward`;
        returns [batch, heads, hd] in the rows' own order."""
        self.kv.k[0].index_copy_(0, meta.slot_mapping, self.k[order])  # as the model's forward does first
        self.kv.v[0].index_copy_(0, meta.slot_mapping, self.v[order])
        out = backend.forward(self.q[order], self.k[order], self.v[order], meta, self.kv.k[0], self.kv.v[0])
        back = torch.empty_like(out)
        back[order] = out
        return back.view(self.q.shape)


def median_ms(fn, reps: int, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench attention", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30, help="per-step figure = per-layer x this")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel = load()
    rng = random.Random(0)
    cases = {"batch 32, ctx 64..512": [rng.randint(64, 512) for _ in range(32)], "batch 1, ctx 512": [512]}
    print(f"machine: {cpu_description()}; median of {args.runs} runs x {args.reps} calls; shapes: {args.heads} "
          f"heads, {args.kv_heads} kv heads, head_dim {args.head_dim}")
    print(f"{'case':<24} {'dtype':<9} {'torch ms/layer':>15} {'kernel ms/layer':>16} {'speedup':>8} "
          f"{'torch ms/step':>14} {'kernel ms/step':>15}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, lens in cases.items():
            case = DecodeCase(lens, args.heads, args.kv_heads, args.head_dim, dtype, seed=len(lens))
            torch_path, paged = case.backend(None), case.backend(kernel)
            t = median_ms(partial(case.attention, torch_path, *case.metadata(torch_path)), args.reps, args.runs)
            k = median_ms(partial(case.attention, paged, *case.metadata(paged)), args.reps, args.runs)
            print(f"{name:<24} {str(dtype).removeprefix('torch.'):<9} {t:>15.3f} {k:>16.3f} {t / k:>7.2f}x "
                  f"{t * args.layers:>14.1f} {k * args.layers:>15.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
