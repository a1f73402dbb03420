"""Keep a long labeling run's memory flat: glibc's malloc otherwise keeps freed blocks of the per-batch logits.

glibc serves a large allocation with mmap (returned to the system when freed) only above a threshold that it raises
every time such a block is freed, up to 32 MiB; after the first batch, the (batch x classes) float32 blocks of a
wide teacher (16 MiB per chunk at 151,936 classes) come from the heap instead, whose freed space is fragmented and
kept: measured, resident memory grew by 300 kB per labeled row (C x 2 bytes) and reached 2 GB for 4,096 rows.
Fixing the threshold at 1 MiB keeps it flat (490 MB from the first to the last of those rows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@cache
def keep_large_blocks_mapped(threshold: int = 1 << 20) -> bool:
    """Serve allocations of `threshold` bytes or more with mmap for the rest of the process (glibc only; elsewhere
    nothing to do). Returns whether the setting was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator has no dynamic threshold to fix
        return False
