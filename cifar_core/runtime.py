"""Process-level settings that make CPU training and inference fast on Linux.

glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free. A conv net's
activations at 160-224 px are hundreds of MB per batch, so each forward pass page-faults its
whole working set in again, zero-filled by the kernel: on this 2-core CPU the frozen EfficientNet-
Lite0 stages at 192 px ran at 45 images/s with the cores ~70% in the kernel, and at 299 images/s
(0% system time) once large blocks stay in the heap for reuse; the full model's forward went from
59 to 109 images/s (benchmarks/transfer_cost.py throughput). The price is that the process keeps
its peak heap instead of returning it between batches.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and to keep freed memory (no-op and
    False elsewhere, e.g. macOS or musl). Idempotent; call before the heavy work starts."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _done


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB (Linux reports KiB), memory-mapped file pages included."""
    import resource  # Unix only: imported here so that the rest of this module loads anywhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
