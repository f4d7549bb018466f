"""The attention-backend seam: one interface between the model and whatever computes paged attention.

A backend is built once per engine with the heads *this process* computes (`num_heads`, `num_kv_heads`:
under tensor parallelism a rank's local share, never the model's global count), the head dim, the block
size, the device and the dtype. Per step it turns the scheduled chunks into its metadata
(`metadata(chunks, num_decode)`, once per step, before the forward pass); per layer it runs the step's
attention over the paged cache (`forward`), the new tokens' K and V already written at
`metadata.slot_mapping`.

A *chunk* is one scheduled sequence: `(block_table, num_cached, num_new)`, the tokens before `num_cached`
already in the cache, `num_new` computed this step. Rows come packed, decode rows (one new token each) first.

The cache (`engine.kv_cache.PagedKVCache`) is per layer `[num_blocks * block_size, num_kv_heads, head_dim]`
for K and for V, a view of `[num_blocks, block_size, num_kv_heads, head_dim]`: FlashInfer's "NHD" paged
layout with K and V as a tuple, so every backend reads it in place, with no conversion.

Implementations:
  * `torch`: gather + SDPA, any device and dtype; the reference every other backend is tested against.
  * `cpu_kernel`: the C++ kernels (`engine.kernels`), reading blocks in place; on CPU, float32 or bfloat16
    (its paged prefill kernel where the CPU has AVX-512-BF16, else the torch prefill path). Its library also
    carries the fused bf16 ops the model uses (`fused_ops`).
  * `flashinfer`: CUDA only, `flashinfer-python` (the `cuda` extra) imported when chosen: paged decode
    (BatchDecodeWithPagedKVCacheWrapper) and ragged prefill over the paged KV
    (BatchPrefillWithPagedKVCacheWrapper, causal, bottom-right aligned: a chunk after cached context sees it
    all). It alone can run under CUDA graphs (`graph_metadata`, `plan_graph`: static page-table buffers).
  * `auto`: flashinfer on CUDA where it imports, else torch; cpu_kernel on CPU where it builds, else torch.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Chunk = tuple[list[int], int, int]  # (block table, tokens already in the cache, new tokens)

# Decode rows attended together by the torch path (sorted by context length); 4-8 measured best
# on 32 mixed-length sequences (64..512 tokens) on a 2-core CPU.
DECODE_GROUP_SIZE = 8
FLASHINFER_WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's split-k scratch (its examples' size)


def slot_ids(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Slot ids of token positions [start, end) of a sequence, on the CPU (int64)."""
    table = torch.tensor(block_table, dtype=torch.long)
    pos = torch.arange(start, end, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


@dataclass
class AttentionMetadata:
    """What one step's attention needs, built by its backend (`AttentionBackend.metadata`)."""

    slot_mapping: torch.Tensor  # [num_tokens] slot of each new token's KV (the model writes them there)
    num_decode: int
    # torch path. Decode rows come sorted by context length and are attended in small groups
    # (row_start, row_end, slots [rows, group_max_ctx] padded with slot 0, mask
    # [rows, 1, 1, group_max_ctx] or None when the group's lengths are equal):
    # padding every row to the batch's longest context wastes up to half the KV
    # reads on mixed lengths, and one huge gather is slower than a few cache-sized ones.
    decode_groups: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    # prefill chunks: (q_start, q_end, context_slots [ctx_end] or None if no earlier context, mask or None)
    prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)
    # Paged kernels (cpu_kernel): per decode row its block table [num_decode, max_blocks] (int32, padded with 0)
    # and context length [num_decode] (int32, the new token included); per prefill chunk its block table, where
    # its rows start among the prefill rows [chunks + 1] and its context length with the chunk.
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    prefill_query_starts: torch.Tensor | None = None
    prefill_context_lens: torch.Tensor | None = None
    # flashinfer: the wrappers planned for this step (None where the step has no such rows)
    decode_wrapper: object | None = None
    prefill_wrapper: object | None = None


class AttentionBackend:
    """Builds a step's metadata from its chunks and runs decode and prefill attention over the paged cache."""

    name = ""
    fused_ops = None  # the C++ fused bf16 ops (`LlamaModel.use_fused_ops`) where this backend's library has them
    supports_cuda_graphs = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, device: torch.device,
                 dtype: torch.dtype):
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV-head groups")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size = block_size
        self.device, self.dtype = device, dtype
        self.scale = head_dim ** -0.5

    def metadata(self, chunks: list[Chunk], num_decode: int) -> AttentionMetadata:
        """The step's metadata; `chunks[:num_decode]` are decode rows (one new token each)."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Attention of the step's rows, `[n, num_heads * head_dim]`; q `[n, heads, hd]`, k and v the new rows'
        `[n, kv_heads, hd]` (already in the cache)."""
        raise NotImplementedError

    def _decode_slots(self, decodes: list[Chunk]) -> torch.Tensor:
        bs = self.block_size
        return torch.tensor([table[start // bs] * bs + start % bs for table, start, _ in decodes], dtype=torch.long)


class TorchBackend(AttentionBackend):
    """Gather each row's context into a contiguous copy, then SDPA: any device and dtype (the oracle)."""

    name = "torch"

    def metadata(self, chunks: list[Chunk], num_decode: int) -> AttentionMetadata:
        slot_parts: list[torch.Tensor] = []
        meta = AttentionMetadata(torch.empty(0), num_decode)
        self._decode_metadata(meta, chunks[:num_decode], slot_parts)
        self._prefill_metadata(meta, chunks[num_decode:], slot_parts)
        meta.slot_mapping = torch.cat(slot_parts).to(self.device) if slot_parts else meta.slot_mapping
        return meta

    def _decode_metadata(self, meta: AttentionMetadata, decodes: list[Chunk], slot_parts: list) -> None:
        bs, dev = self.block_size, self.device
        for r0 in range(0, len(decodes), DECODE_GROUP_SIZE):
            group = decodes[r0:r0 + DECODE_GROUP_SIZE]
            lens = [start + 1 for _, start, _ in group]
            max_ctx = max(lens)
            nblk = -(-max_ctx // bs)
            table = torch.tensor([t[:nblk] + [0] * (nblk - len(t[:nblk])) for t, _, _ in group])
            pos = torch.arange(max_ctx)
            slots = table[:, pos // bs] * bs + pos % bs  # [rows, max_ctx]
            ctx = torch.tensor(lens)
            slot_parts.append(slots[torch.arange(len(group)), ctx - 1])
            mask = None
            if min(lens) != max_ctx:
                valid = pos[None, :] < ctx[:, None]
                slots = slots * valid
                mask = valid.view(len(group), 1, 1, max_ctx).to(dev)
            meta.decode_groups.append((r0, r0 + len(group), slots.to(dev), mask))

    def _prefill_metadata(self, meta: AttentionMetadata, prefills: list[Chunk], slot_parts: list) -> None:
        dev = self.device
        q = meta.num_decode
        for table, start, n in prefills:
            end = start + n
            slots = slot_ids(table, 0, end, self.block_size)
            slot_parts.append(slots[start:])
            if start == 0:
                meta.prefills.append((q, q + n, None, None))
            else:
                mask = torch.arange(end, device=dev)[None, :] <= torch.arange(start, end, device=dev)[:, None]
                meta.prefills.append((q, q + n, slots.to(dev), mask))
            q += n

    def forward(self, q, k, v, meta, k_cache, v_cache) -> torch.Tensor:
        n, nh, hd = q.shape
        out = torch.empty(n, nh, hd, dtype=q.dtype, device=q.device)
        self._decode(out, q, meta, k_cache, v_cache)
        self._prefill(out, q, k, v, meta, k_cache, v_cache)
        return out.view(n, nh * hd)

    def _decode(self, out, q, meta, k_cache, v_cache) -> None:
        hd = q.shape[-1]
        kvh = k_cache.shape[1]
        # torch's CPU SDPA is far slower on one-token bf16 queries than in fp32: there the torch path
        # computes decode attention in fp32 (the gather stays in the cache's dtype)
        upcast = q.device.type == "cpu" and q.dtype != torch.float32
        for r0, r1, slots, mask in meta.decode_groups:
            rows, ctx = slots.shape
            qd = q[r0:r1].unsqueeze(2)
            kd = k_cache.index_select(0, slots.view(-1)).view(rows, ctx, kvh, hd).transpose(1, 2)
            vd = v_cache.index_select(0, slots.view(-1)).view(rows, ctx, kvh, hd).transpose(1, 2)
            if upcast:
                qd, kd, vd = qd.float(), kd.float(), vd.float()
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[r0:r1] = od.squeeze(2)

    def _prefill(self, out, q, k, v, meta, k_cache, v_cache) -> None:
        for qs, qe, ctx_slots, mask in meta.prefills:
            qi = q[qs:qe].transpose(0, 1).unsqueeze(0)
            if ctx_slots is None:  # no earlier context: the chunk's own fresh KV, plain causal
                ki, vi = k[qs:qe], v[qs:qe]
            else:
                ki, vi = k_cache.index_select(0, ctx_slots), v_cache.index_select(0, ctx_slots)
            oi = F.scaled_dot_product_attention(qi, ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0),
                                                attn_mask=mask, is_causal=ctx_slots is None, scale=self.scale,
                                                enable_gqa=True)
            out[qs:qe] = oi.squeeze(0).transpose(0, 1)


def _padded_tables(chunks: list[Chunk], block_size: int) -> tuple[torch.Tensor, list[int]]:
    """Each chunk's blocks up to its context end, padded with block 0: ([chunks, max_blocks] int32, ends)."""
    ends = [start + n for _, start, n in chunks]
    nblk = [-(-e // block_size) for e in ends]
    width = max(nblk)
    tables = torch.tensor([t[:k] + [0] * (width - k) for (t, _, _), k in zip(chunks, nblk, strict=True)],
                          dtype=torch.int32)
    return tables, ends


class CpuKernelBackend(TorchBackend):
    """The C++ kernels (`engine.kernels`): decode and prefill read K/V blocks where they lie in the cache. The
    prefill kernel runs bf16 on AVX-512-BF16 for the head shapes it is compiled for; elsewhere prefill takes the
    torch path."""

    name = "cpu_kernel"

    def __init__(self, *args, decode_kernel, **kwargs):
        super().__init__(*args, **kwargs)
        from pdserve.engine.kernels import prefill_attention_kernel

        self.decode_kernel = decode_kernel
        self.prefill_kernel = prefill_attention_kernel(decode_kernel, self.dtype, self.head_dim,
                                                       self.num_heads // self.num_kv_heads)
        self.fused_ops = torch.ops.pdserve if self.dtype == torch.bfloat16 else None

    def _decode_metadata(self, meta, decodes, slot_parts) -> None:
        if not decodes:
            return
        tables, ends = _padded_tables(decodes, self.block_size)
        meta.decode_block_tables = tables.to(self.device)
        meta.decode_context_lens = torch.tensor(ends, dtype=torch.int32).to(self.device)
        slot_parts.append(self._decode_slots(decodes))

    def _prefill_metadata(self, meta, prefills, slot_parts) -> None:
        if not prefills or self.prefill_kernel is None:
            super()._prefill_metadata(meta, prefills, slot_parts)
            return
        tables, ends = _padded_tables(prefills, self.block_size)
        meta.prefill_block_tables = tables.to(self.device)
        meta.prefill_query_starts = torch.tensor([0, *itertools.accumulate(n for _, _, n in prefills)],
                                                 dtype=torch.int32).to(self.device)
        meta.prefill_context_lens = torch.tensor(ends, dtype=torch.int32).to(self.device)
        # the kernel reads the context through the block table: the new tokens' slots only
        slot_parts.extend(slot_ids(t, start, start + n, self.block_size) for t, start, n in prefills)

    def _decode(self, out, q, meta, k_cache, v_cache) -> None:
        d = meta.num_decode
        if d:
            self.decode_kernel(out[:d], q[:d], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                               self.block_size, self.scale)

    def _prefill(self, out, q, k, v, meta, k_cache, v_cache) -> None:
        if meta.prefill_block_tables is None:
            super()._prefill(out, q, k, v, meta, k_cache, v_cache)
            return
        d = meta.num_decode
        self.prefill_kernel(out[d:], q[d:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_starts,
                            meta.prefill_context_lens, self.block_size, self.scale)


class FlashInferBackend(AttentionBackend):
    """FlashInfer on CUDA: paged decode and ragged prefill over the paged KV, planned once per step on the host
    (page tables as CSR: `indptr`, `indices`, `last_page_len`), run per layer. CUDA graphs: one decode wrapper per
    batch-size bucket over static page-table buffers (`graph_metadata`), re-planned before each replay."""

    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, *args, max_blocks_per_seq: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device.type != "cuda":
            raise ValueError(f"attention_backend flashinfer runs on CUDA, not {self.device.type}")
        import flashinfer  # the `cuda` extra; imported only when chosen

        self._fi = flashinfer
        self.max_blocks_per_seq = max_blocks_per_seq
        self.workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # FlashInfer's decode kernels are compiled for small GQA groups; larger groups decode on its prefill
        # (tensor-core) kernels, as vLLM configures it
        self.tensor_cores = self.num_heads // self.num_kv_heads > 4
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                            use_tensor_cores=self.tensor_cores)
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")

    def _csr(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Page tables as FlashInfer's CSR on the host (its `plan` copies them over without a sync)."""
        bs = self.block_size
        ends = [start + n for _, start, n in chunks]
        nblk = [-(-e // bs) for e in ends]
        indptr = torch.tensor([0, *itertools.accumulate(nblk)], dtype=torch.int32)
        indices = torch.tensor(list(itertools.chain.from_iterable(t[:k] for (t, _, _), k in zip(chunks, nblk,
                                                                                              strict=True))),
                               dtype=torch.int32)
        last = torch.tensor([e - (k - 1) * bs for e, k in zip(ends, nblk, strict=True)], dtype=torch.int32)
        return indptr, indices, last

    def _plan_decode(self, wrapper, chunks: list[Chunk]) -> None:
        indptr, indices, last = self._csr(chunks)
        wrapper.plan(indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
                     pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale)

    def metadata(self, chunks: list[Chunk], num_decode: int) -> AttentionMetadata:
        decodes, prefills = chunks[:num_decode], chunks[num_decode:]
        parts = [self._decode_slots(decodes)] if decodes else []
        parts.extend(slot_ids(t, start, start + n, self.block_size) for t, start, n in prefills)
        meta = AttentionMetadata(torch.cat(parts).to(self.device, non_blocking=True), num_decode)
        if decodes:
            self._plan_decode(self.decode_wrapper, decodes)
            meta.decode_wrapper = self.decode_wrapper
        if prefills:
            qo = torch.tensor([0, *itertools.accumulate(n for _, _, n in prefills)], dtype=torch.int32)
            indptr, indices, last = self._csr(prefills)
            self.prefill_wrapper.plan(qo, indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim,
                                      self.block_size, causal=True, pos_encoding_mode="NONE", sm_scale=self.scale,
                                      q_data_type=self.dtype, kv_data_type=self.dtype)
            meta.prefill_wrapper = self.prefill_wrapper
        return meta

    def forward(self, q, k, v, meta, k_cache, v_cache) -> torch.Tensor:
        n, nh, hd = q.shape
        bs, kvh = self.block_size, k_cache.shape[1]
        cache = (k_cache.view(-1, bs, kvh, hd), v_cache.view(-1, bs, kvh, hd))  # NHD pages, in place
        d = meta.num_decode
        if n == d:
            return meta.decode_wrapper.run(q.contiguous(), cache).view(n, nh * hd)
        if d == 0:
            return meta.prefill_wrapper.run(q.contiguous(), cache).view(n, nh * hd)
        out = torch.empty(n, nh, hd, dtype=q.dtype, device=q.device)
        out[:d] = meta.decode_wrapper.run(q[:d].contiguous(), cache)
        out[d:] = meta.prefill_wrapper.run(q[d:].contiguous(), cache)
        return out.view(n, nh * hd)

    # -- CUDA graphs -----------------------------------------------------------------------------------
    def graph_metadata(self, batch_size: int) -> AttentionMetadata:
        """Metadata over static buffers for a captured decode batch of `batch_size` rows: its own decode wrapper
        whose page tables live in fixed buffers (FlashInfer's CUDA-graph mode), and a static slot mapping."""
        dev = self.device
        wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(batch_size * self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=dev))
        meta = AttentionMetadata(torch.zeros(batch_size, dtype=torch.long, device=dev), batch_size)
        meta.decode_wrapper = wrapper
        return meta

    def plan_graph(self, meta: AttentionMetadata, decodes: list[Chunk]) -> None:
        """Fill a captured batch's static metadata for these decode rows (exactly its batch size, padded)."""
        self._plan_decode(meta.decode_wrapper, decodes)
        meta.slot_mapping.copy_(self._decode_slots(decodes), non_blocking=True)


_warned: set[str] = set()


def _warn_once(message: str, *args) -> None:
    text = message % args
    key = text.splitlines()[0]
    if key not in _warned:
        _warned.add(key)
        logger.warning(text)


def flashinfer_importable() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(name: str, *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, max_blocks_per_seq: int = 0,
                 kernel_build_root=None, compiler: str = "c++") -> AttentionBackend:
    """The backend `EngineConfig.attention_backend` names, for the heads this process computes.

    "torch" always builds. "cpu_kernel" raises (ValueError, `KernelBuildError`) where it cannot run; "flashinfer"
    raises ValueError off CUDA and ImportError without `flashinfer-python`. "auto": flashinfer on CUDA where it
    imports, cpu_kernel on CPU for float32 and bfloat16 where it builds, else torch (one warning per reason)."""
    from pdserve.engine.config import ATTENTION_BACKENDS
    from pdserve.engine.kernels import KERNEL_DTYPES, KernelBuildError, load

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    args = (num_heads, num_kv_heads, head_dim, block_size, device, dtype)
    if name == "auto":
        if device.type == "cuda":
            if flashinfer_importable():
                return FlashInferBackend(*args, max_blocks_per_seq=max_blocks_per_seq)
            _warn_once("flashinfer-python is not installed (pip install 'pdserve[cuda]'): attention takes the torch "
                       "path (gather + SDPA)")
        elif device.type == "cpu" and dtype in KERNEL_DTYPES:
            try:
                return CpuKernelBackend(*args, decode_kernel=load(kernel_build_root, compiler=compiler))
            except KernelBuildError as e:
                _warn_once("paged-attention kernel unavailable, using the torch path (gather + SDPA): %s", e)
        return TorchBackend(*args)
    if name == "cpu_kernel":
        if device.type != "cpu" or dtype not in KERNEL_DTYPES:
            raise ValueError(f"attention_backend cpu_kernel runs on CPU with float32 or bfloat16, not {device.type} "
                             f"{dtype}")
        return CpuKernelBackend(*args, decode_kernel=load(kernel_build_root, compiler=compiler))
    if name == "flashinfer":
        return FlashInferBackend(*args, max_blocks_per_seq=max_blocks_per_seq)
    return TorchBackend(*args)
