"""The user's weights files: safetensors, or a PyTorch state dict (``.pt``, ``.pth``, ``.bin``, ...).

A PyTorch file is only ever read with ``torch.load(weights_only=True)``: a pickle that would run code, or that
holds Python objects other than tensors and plain containers, is refused, never executed. The state dict may
sit at the top level or under ``state_dict``, ``model`` or ``model_state_dict`` (the usual training
checkpoints); the ``module.`` prefix of ``DataParallel``/``DistributedDataParallel`` and the ``_orig_mod.``
prefix of ``torch.compile`` are removed. Weights load completely or not at all: before anything is copied,
every missing and unexpected key and every shape that differs is checked, and the error names them.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import ConvscopeError

NESTED = ("state_dict", "model", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")


def sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of a state dict's names, dtypes, shapes and values: equal exactly when the weights are."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped and with wrapper prefixes removed (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConvscopeError(f"weights file {str(path)!r} {what}")
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    for key in NESTED:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ConvscopeError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict; save "
                             "model.state_dict() (torch.save(model.state_dict(), path))")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ConvscopeError(f"{str(path)!r} holds no tensors (keys: {', '.join(map(str, list(obj)[:8]))}); "
                             f"expected a state dict, at the top level or under {' or '.join(NESTED)}")
    return _strip_prefixes(state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConvscopeError(f"weights file {str(path)!r} is not readable safetensors ({e})") from e


def _read_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvscopeError(
            f"refused to load {str(path)!r}: it holds Python objects other than tensors (a pickle that would run "
            "code when loaded), and convscope loads weights with weights_only=True only. Save the weights alone: "
            f"torch.save(model.state_dict(), path). ({str(e).splitlines()[0]})") from None
    except Exception as e:  # torch raises many types for a file that is not a zip/pickle of tensors
        raise ConvscopeError(f"weights file {str(path)!r} is corrupt, truncated or not a PyTorch file "
                             f"({type(e).__name__}: {e})") from None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading into ``model``: the first missing and unexpected keys and the shapes
    that differ, as one sentence; None when it fits exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for what, items in (("missing from the file", missing), ("not in the model", unexpected),
                        ("shapes differ", shapes)):
        if items:
            parts.append(f"{len(items)} {what}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
    return "; ".join(parts) or None


def fit(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, what: str = "the model") -> None:
    """Load ``state`` (read from ``source``) into ``model``, completely or not at all."""
    problem = mismatch(model, state)
    if problem:
        raise ConvscopeError(f"the weights in {str(source)!r} do not fit {what} ({problem}); check that the model "
                             "spec and its arguments (--model-arg) build the network the weights were saved from")
    model.load_state_dict(state, strict=True)


def load_weights(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``path`` and load it into ``model``, completely or not at all. Returns the state dict."""
    state = read_state_dict(path)
    fit(model, state, path)
    return state


__all__ = ["fit", "load_weights", "mismatch", "read_state_dict", "sha256", "state_sha256"]
