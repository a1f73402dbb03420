"""Keep a long labeling run's memory flat: glibc's malloc otherwise keeps freed blocks of the per-batch logits.

glibc serves a large allocation with mmap (returned to the system when freed) only above a threshold that it raises
every time such a block is freed, up to 32 MiB; after the first batch, the (batch x classes) float32 blocks of a
wide teacher come from the heap instead, where the small arrays kept between batches (a shard's top-k) fragment it
and freed space is never returned. Measured: resident memory grew by C x 2-5 bytes per labeled row (to 2 GB for
4,096 rows at 151,936 classes; 332 -> 1,119 MB over 8,192 rows at 30,000). With the threshold fixed at 4 MiB it
stays flat (332 -> 483 MB for the latter).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3


@cache
def keep_large_blocks_mapped(threshold: int = 4 << 20) -> bool:
    """Serve allocations of `threshold` bytes or more with mmap for the rest of the process (glibc only; elsewhere
    nothing to do). Returns whether the setting was applied. (Labeling reuses one scratch buffer for the per-chunk
    log-sum-exps, so few such blocks are allocated per batch and mapping them fresh costs little.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # and keep the heap (blocks below the threshold) instead of returning its top to the system after every
        # free: a page fault costs tens of microseconds on the virtual machines measured here, and re-faulting a
        # few MB per operation made small float64 statistics 10x slower
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator has no dynamic threshold to fix
        return False
