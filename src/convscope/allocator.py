"""Keeping freed memory in the process: what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc, in glibc.

glibc's ``malloc`` serves each block of 128 KiB or more (every activation and gradient here) by a fresh
``mmap`` and hands it back with ``munmap`` when freed, so every layer of every step writes to pages the kernel
must first fault in and zero. On this project's two-core machine that is a fifth of a training step of
``zfnet_small`` (``benchmarks/allocator.py``: 0.79-0.83 of the time with this setting; an inference forward pass
gains less, 0.8-1.0). Raising the mmap and trim
thresholds lets freed blocks be reused, as jemalloc and tcmalloc (``LD_PRELOAD``) do, with no library to
install. Every number computed stays the same, bit for bit; only the addresses change. The cost: the process
keeps the memory of its peak until it exits.

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
