"""How much memory a command may use (``--max-memory``): its budget, given or by default a share of the
machine's memory (of the GPU's, for a model on a GPU); the analyses size their batches from it."""

from __future__ import annotations

import os
import re

import torch

from .errors import ConvscopeError

SHARE = 0.25  # of the machine's memory, the budget when none is given
GPU_SHARE = 0.5  # of the GPU's free memory, for a model there
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse(text: str | int | float) -> int:
    """``4G``, ``512M``, ``1.5GB``, ``2GiB`` or a number of bytes, as bytes."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
        if not found:
            raise ConvscopeError(f"--max-memory {text!r} is not an amount of memory: give bytes or a number with K, M "
                                 "or G (4G, 512M, 1.5GB)")
        value = float(found[1]) * _UNITS[found[2].lower()]
    if value < 1 << 20:
        raise ConvscopeError(f"--max-memory {text!r} is less than 1 MB: nothing fits in it")
    return int(value)


def machine() -> int | None:
    """This machine's memory in bytes (None where the system does not say: not a POSIX system)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def budget(max_memory: str | int | float | None = None, device: torch.device | str | None = None) -> int:
    """The bytes a command (one process of it) may use: ``max_memory`` (:func:`parse`), else :data:`SHARE` of the
    machine's memory shared by the processes torchrun starts on it (``LOCAL_WORLD_SIZE``), or :data:`GPU_SHARE`
    of the free memory of ``device`` where it is a GPU (4 GiB where neither is known)."""
    if max_memory is not None:
        return parse(max_memory)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(GPU_SHARE * torch.cuda.mem_get_info(device)[0])
    total = machine()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return int(SHARE * total / local) if total else 4 << 30


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
