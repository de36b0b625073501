"""Host-memory allocator tuning for CPU training.

A training step allocates and frees the same large activation and gradient buffers every time. glibc's
malloc serves buffers above its mmap threshold with fresh mmaps and returns freed heap memory to the OS,
so every step pays page faults to zero the same memory again. On the 2-core CPU this cost 25-30% of a
DP-SGD step (docs/performance.md). Raising the thresholds keeps freed memory in the process for reuse —
what tcmalloc/jemalloc, recommended by PyTorch's CPU performance guide, do by design.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                        top_pad: int = 256 << 20) -> bool:
    """Tune glibc malloc (Linux only) so freed buffers are reused; True if it was applied.

    32 MiB is glibc's largest allowed mmap threshold on 64-bit systems.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(libc.mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                      (_M_TRIM_THRESHOLD, trim_threshold),
                                                      (_M_TOP_PAD, top_pad)))
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
