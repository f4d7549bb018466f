"""How big the KV cache is: from the device's memory on CUDA, from the config on CPU.

On CUDA (with `cache.num_kv_blocks` unset) the engine, after loading the weights, runs one
forward pass of the largest step the scheduler can plan (`max_num_batched_tokens` tokens, the
logits of `max_num_seqs` rows) and measures what it used at its peak (`DeviceMemory`). The KV
cache then gets what is left of `gpu_memory_utilization` of the device:

    kv bytes = total x gpu_memory_utilization - peak in use (weights, activations, CUDA context,
               other processes on the device)

and at least one block, else `KVCacheTooSmall` says how much is missing. A tensor-parallel worker runs the pass
on every rank at once (each its shard, each measuring its own device) and takes the smallest count of blocks over
its ranks (`LLMEngine._num_kv_blocks_tp`). On CPU the host's
memory is shared with everything else on it, so the pool is `kv_cache_memory_gb`, as configured.

`kv_cache_blocks` is the arithmetic alone (unit-tested with given numbers); `DeviceMemory` is
the measuring half, CUDA-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_GIB = 2**30


class KVCacheTooSmall(RuntimeError):
    """The device has no room for even one KV block after the weights and the largest step."""

    def __init__(self, message: str, *, missing_bytes: int):
        super().__init__(message)
        self.missing_bytes = missing_bytes


def kv_cache_blocks(total_bytes: int, utilization: float, peak_in_use_bytes: int, bytes_per_block: int) -> int:
    """KV blocks that fit in `total_bytes x utilization` beside `peak_in_use_bytes` (at least one, else
    `KVCacheTooSmall` with the shortfall)."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    budget = int(total_bytes * utilization) - peak_in_use_bytes
    if budget < bytes_per_block:
        missing = bytes_per_block - budget
        raise KVCacheTooSmall(
            f"no room for the KV cache: {utilization:.0%} of the device's {total_bytes / _GIB:.2f} GiB is "
            f"{total_bytes * utilization / _GIB:.2f} GiB, and the weights and the largest step already use "
            f"{peak_in_use_bytes / _GIB:.2f} GiB at their peak; one KV block needs {bytes_per_block} bytes, "
            f"{missing / _GIB:.3f} GiB more than is left. Raise --gpu-memory-utilization, lower "
            "--max-num-batched-tokens or --max-num-seqs, or use a device with more memory",
            missing_bytes=missing)
    return budget // bytes_per_block


@dataclass(frozen=True)
class MemorySnapshot:
    """A CUDA device's memory after a profiling pass."""

    total_bytes: int  # the device's memory
    free_bytes: int  # free on the device now (every process counted)
    reserved_bytes: int  # held by this process's caching allocator now
    peak_allocated_bytes: int  # the most this process's tensors held at once since `DeviceMemory.reset`

    @property
    def peak_in_use_bytes(self) -> int:
        """The device's use at this process's peak: everything in use now that is not this process's
        allocator cache (CUDA context, NCCL, other processes), plus its tensors' peak."""
        return self.total_bytes - self.free_bytes - self.reserved_bytes + self.peak_allocated_bytes


class DeviceMemory:
    """Measures a CUDA device's peak memory around a profiling pass: `reset()`, run it, `snapshot()`."""

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"device memory is measured on CUDA, not {device.type}")
        self.device = device

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def snapshot(self) -> MemorySnapshot:
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return MemorySnapshot(total, free, torch.cuda.memory_reserved(self.device),
                              torch.cuda.max_memory_allocated(self.device))


__all__ = ["DeviceMemory", "KVCacheTooSmall", "MemorySnapshot", "kv_cache_blocks"]
