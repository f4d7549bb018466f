"""The paged KV cache's tensors: per layer a pool of fixed-size blocks.

Layout: one tensor `[num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]`.
A token's *slot* is `block * block_size + offset`; per layer the pool is also
viewed flat as `[num_slots, num_kv_heads, head_dim]` so writes are one
`index_copy_` and reads one `index_select`.

Export/import move one sequence's KV between this pool and contiguous tensors
`[2, num_tokens, num_kv_heads, head_dim]` per layer: the primitive KV transfer
builds on. Which blocks belong to whom is `engine.block_manager`'s business.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)
        flat = self.data.view(num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [flat[layer, 0] for layer in range(num_layers)]
        self.v = [flat[layer, 1] for layer in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of token positions [start, end) of a sequence, on the CPU (callers batch the copy)."""
        bs = self.block_size
        table = torch.tensor(block_table, dtype=torch.long)
        pos = torch.arange(start, end, dtype=torch.long)
        return table[pos // bs] * bs + pos % bs

    def export(self, block_table: list[int], num_tokens: int) -> list[torch.Tensor]:
        """A sequence's KV as one contiguous `[2, num_tokens, kv_heads, head_dim]` tensor per layer (a copy:
        tests read what a transfer wrote with it)."""
        self._check_table(block_table, num_tokens)
        slots = self.slots(block_table, 0, num_tokens).to(self.device)
        return [self.data[layer].view(2, -1, self.num_kv_heads, self.head_dim).index_select(1, slots)
                for layer in range(self.num_layers)]

    def write_layer(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write one layer's `[2, n, kv_heads, head_dim]` KV at `slots` (layer-wise transfer uses this)."""
        kv = kv.to(device=self.device, dtype=self.dtype)
        self.k[layer].index_copy_(0, slots, kv[0])
        self.v[layer].index_copy_(0, slots, kv[1])

    def copy_blocks_to(self, dst: PagedKVCache, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (all layers, K and V) from this pool into `dst`: (src block, dst block)
        pairs. Swapping to and from the CPU pool is this.

        When it returns, the copy is complete as far as the caller can tell: a swap-out's blocks are in
        the CPU pool, and its source blocks may be reused (the KV receiver may write into them on its own
        stream as soon as the engine frees them). Between a CUDA pool and the CPU the blocks go through a
        pinned staging buffer (a device copy needs pinned host memory to run asynchronously): a swap-out
        waits for its download's event, once, before it reads the staged bytes (a `non_blocking` copy to
        the host is not done when it returns: reading it at once read whatever was there before); a
        swap-in queues its upload on the compute stream, ahead of the step that reads the blocks."""
        src_ids = torch.tensor([s for s, _ in pairs], device=self.device)
        dst_ids = torch.tensor([d for _, d in pairs], device=dst.device)
        if self.device.type == "cpu" and dst.device.type == "cuda":  # swap-in: gather straight into staging
            shape = (*self.data.shape[:2], len(pairs), *self.data.shape[3:])
            staged = torch.empty(shape, dtype=self.dtype, pin_memory=True)
            torch.index_select(self.data, 2, src_ids, out=staged)
            dst.data[:, :, dst_ids] = staged.to(dst.device, non_blocking=True)  # `staged` lives until it is read
            return
        blocks = self.data[:, :, src_ids]
        if self.device.type == "cuda" and dst.device.type == "cpu":  # swap-out
            staged = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
            staged.copy_(blocks, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            done.synchronize()
            blocks = staged
        dst.data[:, :, dst_ids] = blocks.to(dst.device)

    def _check_table(self, block_table: list[int], num_tokens: int) -> None:
        need = -(-num_tokens // self.block_size)
        if len(block_table) < need:
            raise ValueError(f"{num_tokens} tokens need {need} blocks, block table has {len(block_table)}")
        bad = [b for b in block_table[:need] if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids out of range [0, {self.num_blocks}): {bad[:8]}")
