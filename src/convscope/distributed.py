"""One command on several processes (``torchrun --nproc-per-node N -m convscope scan RUN``): the ranks, their
shards, and the collectives that join their partial results.

torchrun starts N copies of the command with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`init` joins them into one ``torch.distributed`` group (gloo on the CPU, NCCL on CUDA). Without torchrun
everything here is a group of one and costs nothing. The scan's partial results are exact to merge
(:func:`convscope.topk.merge`), so every rank scans a contiguous shard of the images and :func:`gather_merge`
gives every rank the single-pass result. One process writes into a run: rank 0 holds the run's lock for the
whole job, and the other ranks stop with rank 0's message when it cannot take it (:func:`locked`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import artifacts
from .errors import ConvscopeError

TIMEOUT = 1800  # seconds a rank waits for the others (to join, at a collective); CONVSCOPE_DIST_TIMEOUT sets it


@dataclass(frozen=True)
class Group:
    """This process's ``rank`` among ``world`` processes (rank 0 writes the run's files)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's images of ``n``: a contiguous block, the blocks in rank order covering 0..n-1 once."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device this process computes on: ``cpu``, ``cuda`` (under torchrun, this rank's GPU: ``LOCAL_RANK``),
    ``cuda:N``, ``mps``, or ``auto`` (this rank's GPU where there is one, else the CPU). A device this machine
    does not have is an error that says what it has."""
    spec = "auto" if spec is None else str(spec).strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if spec == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConvscopeError(f"unknown device {spec!r}; valid devices: {', '.join(DEVICES)}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConvscopeError(f"device {spec!r}: PyTorch sees no CUDA GPU here (torch {torch.__version__}: "
                                 "torch.cuda.is_available() is False; no GPU, no driver, or a CPU build of "
                                 "PyTorch); use --device cpu, or install PyTorch's CUDA build on a GPU machine")
        index = local if dev.index is None else dev.index
        count = torch.cuda.device_count()
        if index >= count:
            raise ConvscopeError(f"device {spec!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                 f"cuda:{count - 1}" + (f" (LOCAL_RANK is {local})" if dev.index is None else ""))
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConvscopeError(f"device {spec!r}: this machine has no Apple GPU (MPS); use --device cpu")
        return dev
    raise ConvscopeError(f"unknown device {spec!r}; valid devices: {', '.join(DEVICES)}")


def init(device: torch.device | str = "cpu") -> Group:
    """Join the processes torchrun started (once per process), or a group of one without torchrun. A rank that
    cannot reach the others is an error that says so."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Group()
    rank = int(os.environ.get("RANK", "0"))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    seconds = os.environ.get("CONVSCOPE_DIST_TIMEOUT", str(TIMEOUT))
    if not seconds.isdigit() or not 1 <= int(seconds) <= 7 * 86400:
        raise ConvscopeError(f"CONVSCOPE_DIST_TIMEOUT must be a whole number of seconds from 1 to a week, got "
                             f"{seconds[:20]!r}")
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=int(seconds)))
    except (RuntimeError, ValueError, OSError) as e:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConvscopeError(f"rank {rank} of {world} cannot reach the other processes at {where} within "
                             f"{seconds} s ({first}); start every process with the same torchrun command "
                             "(--nproc-per-node, --nnodes, --rdzv-endpoint)") from None
    return Group(dist.get_rank(), dist.get_world_size())


def broadcast(obj, group: Group):
    """Rank 0's ``obj`` on every rank."""
    if group.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, group: Group) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if group.world == 1:
        return [obj]
    out = [None] * group.world
    dist.all_gather_object(out, obj)
    return out


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


@contextmanager
def locked(folder: str | os.PathLike, what: str, group: Group) -> Iterator[None]:
    """Rank 0 holds ``folder``'s lock (:func:`convscope.artifacts.lock`) while every rank works; when it cannot
    take it (another job writes the run), every rank stops with its message before anything is written."""
    with ExitStack() as stack:
        error = None
        if group.main:
            try:
                stack.enter_context(artifacts.lock(Path(folder), what))
            except ConvscopeError as e:
                error = str(e)
        error = broadcast(error, group)
        if error is not None:
            raise ConvscopeError(error)
        yield
        barrier(group)  # rank 0 lets go of the lock only when every rank is done


__all__ = ["DEVICES", "Group", "barrier", "broadcast", "device", "gather", "init", "locked"]
