"""CUDA graphs for decode-only steps: hundreds of kernel launches per step replayed as one.

At engine start, for each batch-size bucket (`EngineConfig.cuda_graph_batch_sizes`, capped at the scheduler's
`max_num_seqs`), the model's forward pass over a decode batch of that size is captured once, over static
buffers: token ids, positions, the slot mapping and the attention backend's page tables (FlashInfer's CUDA-graph
mode; `AttentionBackend.graph_metadata`). A decode-only step of n rows copies its inputs into the smallest bucket
B >= n, pads rows n..B-1 with a dummy row (token 0 at position 0, its KV written to the *padding block*: one block
past the block manager's pool, allocated with the cache and never handed out), re-plans the attention for the B
rows on the host, and replays. Steps with a prefill chunk, more rows than the largest bucket, prompt logprobs or
KV to ship run eagerly, as do all steps with `enforce_eager`.

Captured steps run no Python per layer, so `forward`'s `on_layer` (the stall heartbeat, layer-wise KV shipping)
fires once after the replay instead; decode-only steps ship no KV. CUDA only: never run on the CPU machines this
was written on (tests/engine/test_cuda_graphs.py, marked `gpu`).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionBackend, AttentionMetadata, Chunk

logger = logging.getLogger(__name__)


def graph_batch_sizes(configured: tuple[int, ...], max_num_seqs: int) -> list[int]:
    """The buckets worth capturing: the configured sizes up to the first one that holds `max_num_seqs` rows."""
    sizes = []
    for b in sorted(configured):
        sizes.append(b)
        if b >= max_num_seqs:
            break
    return sizes


def bucket_for(sizes: list[int], rows: int) -> int | None:
    """The smallest captured batch size that holds `rows` rows, or None (run eagerly)."""
    i = bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else None


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    hidden: torch.Tensor  # the graph's output buffer: read before the next replay


class DecodeGraphs:
    """The captured decode graphs of one engine (see the module docstring)."""

    def __init__(self, model, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor], backend: AttentionBackend,
                 sizes: list[int], padding_block: int):
        if not backend.supports_cuda_graphs:
            raise ValueError(f"attention backend {backend.name} cannot run under CUDA graphs")
        self.model, self.kv_k, self.kv_v, self.backend = model, kv_k, kv_v, backend
        self.sizes = sizes
        self.pad_chunk: Chunk = ([padding_block], 0, 1)
        self.graphs: dict[int, _Captured] = {}
        self.replays = 0

    def capture(self) -> None:
        """Capture every bucket, largest first, all in one memory pool (a smaller graph reuses the larger's)."""
        t0 = time.perf_counter()
        dev = self.backend.device
        pool = None
        for size in reversed(self.sizes):
            ids = torch.zeros(size, dtype=torch.long, device=dev)
            positions = torch.zeros(size, dtype=torch.long, device=dev)
            meta = self.backend.graph_metadata(size)
            self.backend.plan_graph(meta, [self.pad_chunk] * size)
            side = torch.cuda.Stream(device=dev)  # warm-up (lazy init, workspace sizing) outside the capture
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model.forward(ids, positions, meta, self.kv_k, self.kv_v)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model.forward(ids, positions, meta, self.kv_k, self.kv_v)
            pool = graph.pool()
            self.graphs[size] = _Captured(graph, ids, positions, meta, hidden)
        torch.cuda.synchronize(dev)
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.sizes, time.perf_counter() - t0)

    def can_run(self, rows: int) -> bool:
        return bucket_for(self.sizes, rows) is not None

    def run(self, chunks: list[Chunk], input_ids: list[int], positions: list[int]) -> torch.Tensor:
        """Hidden states `[len(chunks), hidden]` of a decode-only step (every chunk one new token), replayed in
        its bucket's graph. The result is a view of the graph's buffer: read it before the next `run`."""
        n = len(chunks)
        size = bucket_for(self.sizes, n)
        if size is None:
            raise ValueError(f"{n} decode rows exceed the largest captured batch ({self.sizes[-1]})")
        g = self.graphs[size]
        pad = size - n
        g.input_ids.copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        g.positions.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.backend.plan_graph(g.meta, chunks + [self.pad_chunk] * pad)
        g.graph.replay()
        self.replays += 1
        return g.hidden[:n]
