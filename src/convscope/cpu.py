"""Running at the CPU's speed without changing a bit: two things PyTorch leaves on the table on the CPU.

**Memory.** glibc's ``malloc`` serves each large block (above a threshold that it raises up to 32 MiB as blocks
are freed) by a fresh ``mmap`` and hands it back with ``munmap`` when freed, and shrinks its heap whenever more
than a trim threshold (twice that one) lies free at its top, so a layer's output keeps landing on pages the
kernel must first fault in and zero. :func:`keep_freed_memory` raises both thresholds so that freed blocks are
reused, as jemalloc and tcmalloc (``LD_PRELOAD``) do, with no library to install: what PyTorch's CPU tuning
guide gets from them. Measured on this project's two-core machine (``benchmarks/cpu.py``): an inference forward
pass of ``zfnet`` at 224 px takes 0.66 of the time (its 148 MB conv1 output is mapped afresh every time), a
training step of ``zfnet_small`` 0.8-0.9. The cost: the process keeps the memory of its peak until it exits.
Every ``convscope`` command calls it; call it in your own script for the same effect. It does nothing off
glibc, or where the environment already chooses (``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` set,
or an allocator preloaded).

**Max-pooling.** PyTorch's row-major max-pool forward on the CPU is several times slower than its channels-last
one (3x3 stride 2 over zfnet_small's conv1 output: 16 ms against 6 ms, the two layout changes included), while
the backward passes cost alike. :func:`channels_last_pooling` runs every float32 ``max_pool2d`` of the CPU in
channels-last, hands back a row-major output, and runs the backward row-major from the same indices. Both
kernels take a window's first maximum in row-major order, so outputs, indices and gradients are the ones
PyTorch computes, bit for bit; convscope's training and evaluation run under it (with memory kept, a training
step of ``zfnet_small`` 0.80 of the default's time instead of 0.88, a forward pass of ``zfnet`` at 224 px 0.51
instead of 0.66).

Neither changes a number: a run trained with them is the run trained without them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

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


def release_freed_memory() -> None:
    """Hand the memory ``malloc`` holds free back to the kernel (glibc's ``malloc_trim``), between the steps of a
    long process: with :func:`keep_freed_memory`, each step's peak would otherwise stay resident, and a later step's
    blocks of other sizes would grow the heap past it. Nothing off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def resident_memory() -> tuple[int, int]:
    """This process's resident memory now and at its peak, in bytes (``/proc``, and ``getrusage``'s peak, which
    Linux counts in kilobytes and macOS in bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        now = peak
    return now, peak


class _ChannelsLastMaxPool(torch.autograd.Function):
    """``max_pool2d`` of a row-major input: forward by the channels-last kernel, backward by the row-major one
    from the same indices (what autograd runs for a row-major pool)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, indices = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last),
                                                              kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x, indices)
        ctx.pool = (kernel, stride, padding, dilation, ceil_mode)
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.pool, indices.contiguous())
        return grad_x, None, None, None, None, None


_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


class _Pooling(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.max_pool2d:
            bound = dict(zip(_POOL_ARGS, args), **kwargs)
            x = bound["input"]
            if (not bound.get("return_indices") and isinstance(x, torch.Tensor) and x.dim() == 4
                    and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()):
                kernel = _pair(bound["kernel_size"])
                return _ChannelsLastMaxPool.apply(x, kernel, _pair(bound.get("stride") or kernel),
                                                  _pair(bound.get("padding", 0)), _pair(bound.get("dilation", 1)),
                                                  bool(bound.get("ceil_mode", False)))
        return func(*args, **kwargs)


def channels_last_pooling() -> TorchFunctionMode:
    """A context in which every float32 ``max_pool2d`` on the CPU (``nn.MaxPool2d`` included, but not one
    returning its indices) runs its forward pass channels-last: the same outputs and gradients, faster."""
    return _Pooling()


__all__ = ["channels_last_pooling", "keep_freed_memory", "release_freed_memory", "resident_memory"]
