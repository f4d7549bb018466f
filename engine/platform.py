"""Process-level tuning for the CPU engine."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed tensor memory to the OS after every step.

    Each decode step allocates and frees the same few-MB activation and KV-gather
    buffers; by default glibc serves allocations above 128 KiB with fresh mmaps
    and unmaps them on free, so every step pays page faults to zero new pages.
    Raising the mmap threshold to its maximum (32 MiB) and the trim threshold
    keeps those pages in the heap for reuse (measured: batch-32 decode step
    ~200 -> ~165 ms, batch 1 ~34 -> ~31 ms on 2 cores). No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        logger.debug("mallopt unavailable; freed memory goes back to the OS")
    return ok


_omp_set_num_threads = None  # libgomp's, once found (False: not found)


def _libgomp_set_num_threads():
    """`omp_set_num_threads` of the OpenMP runtime torch loaded (the copy its wheel ships), or None."""
    global _omp_set_num_threads
    if _omp_set_num_threads is None:
        _omp_set_num_threads = False
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "libgomp" in line and line.rstrip().endswith(".so.1")}
            for path in sorted(paths):
                _omp_set_num_threads = ctypes.CDLL(path).omp_set_num_threads  # already loaded: the same copy
                break
        except (OSError, AttributeError):
            pass
    return _omp_set_num_threads or None


def serial_torch_thread() -> bool:
    """Run the calling thread's torch CPU ops on this thread alone, without an OpenMP team of its own.

    For a server's helper threads (KV senders and receivers, their executors) beside the engine's loop
    thread. libgomp keeps one thread team per thread that runs parallel work: a helper thread copying
    KV with torch's default thread count would add a team, the process would then manage more OpenMP
    threads than it has cores, and libgomp stops spinning between parallel regions for every team, the
    engine's included (each of its ops then sleeps and wakes its threads through futex; see
    `worker.engine_loop`). The count is set for this thread only (the OpenMP ICV of its own; torch's
    `set_num_threads` would also change the process-wide default and MKL's count). Returns False where
    torch's OpenMP runtime is not found (then nothing changes)."""
    import torch

    fn = _libgomp_set_num_threads()
    if fn is None:
        return False
    torch.get_num_threads()  # torch's per-thread lazy init first: it would set the count back later
    fn(1)
    return True


# The ISA extensions that decide which kernels and dtypes run fast here (benchmarks print them).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where it is unreadable or has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is unreadable)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name, e.g. `AMD EPYC`."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> str:
    """The performance-relevant ISA extensions of this CPU, e.g. `avx2 fma avx512f ... avx512_bf16`."""
    flags = cpu_flags()
    return " ".join(f for f in _ISA_FLAGS if f in flags) or "unknown"


def cpu_has_fast_bf16() -> bool:
    """Native bf16 dot products (AVX-512-BF16 or AMX): where oneDNN's bf16 GEMMs beat fp32 (measured on
    SmolLM2's shapes, 2 cores with AVX-512-BF16: 2.5-3x at every batch size). Without them bf16 is emulated
    and slower than fp32."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_description(threads: int | None = None) -> str:
    """One line for benchmark reports: model name, cores, ISA flags, torch build and threads."""
    import os

    import torch

    threads = torch.get_num_threads() if threads is None else threads
    return f"{cpu_model()}, {os.cpu_count()} cores [{cpu_isa()}], torch {torch.__version__}, {threads} threads"
