"""Keeping freed memory in the process: what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc, in glibc.

glibc's ``malloc`` serves each large block (above a threshold that it raises up to 32 MiB as blocks are freed)
by a fresh ``mmap`` and hands it back with ``munmap`` when freed, and shrinks its heap whenever more than a trim
threshold (twice that one) lies free at its top, so a layer's output keeps landing on pages the kernel must
first fault in and zero. Raising the mmap and trim thresholds lets freed blocks be reused, as jemalloc and
tcmalloc (``LD_PRELOAD``) do, with no library to install. Measured on this project's two-core machine
(``benchmarks/allocator.py``, kept over default): an inference forward pass of ``zfnet`` at 224 px 0.68 (its
148 MB conv1 output is mapped afresh every time), a training step of ``zfnet_small`` 0.8-0.9. Every number
computed stays the same, bit for bit; only the addresses change. The cost: the process keeps the memory of its
peak until it exits.

:func:`keep_freed_memory` is called by every ``convscope`` command; call it in your own script for the same
effect. It does nothing off glibc, or where the environment already chooses (``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` set, or an allocator preloaded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused when freed
_TRIM_THRESHOLD = (1 << 31) - 1  # the heap is not shrunk while it has less than 2 GiB free at its top


def keep_freed_memory() -> bool:
    """Let this process's ``malloc`` reuse freed large blocks instead of returning them to the kernel. Returns
    whether it changed the setting (False: not glibc, or the environment chose already)."""
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"):
        return False
    if any(key in os.environ for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


__all__ = ["keep_freed_memory"]
