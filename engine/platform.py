"""Process-level tuning for the CPU engine."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
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
