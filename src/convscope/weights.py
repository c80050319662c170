"""The user's weights files: safetensors, or a PyTorch state dict (``.pt``, ``.pth``, ``.bin``, ...).

A PyTorch file is only ever read with ``torch.load(weights_only=True)``: a pickle that would run code, or that
holds Python objects other than tensors and plain containers, is refused, never executed. Weights load
completely or not at all: before anything is copied, every missing and unexpected key and every shape that
differs is checked, and the error names them.

Weights are found as training scripts save them (:func:`find_weights`). The state dict may sit at the top level
or under a wrapper key: timm's EMA weights first (``state_dict_ema``, ``model_ema``, ``ema``: what timm's own
``load_checkpoint`` prefers), then ``state_dict`` (PyTorch Lightning, timm), ``model``, ``model_state_dict``. The
``module.`` prefix of ``DataParallel``/``DistributedDataParallel`` and the ``_orig_mod.`` prefix of
``torch.compile`` are removed. Where the keys still do not fit, the one prefix whose keys, stripped, fit the
model exactly is taken (Lightning's ``model.``, or ``net.``, ``backbone.``, ``encoder.``: a wrapper module's
attribute), and the rest of the file is left; where several prefixes fit, the file is refused with them listed.
``key`` and ``prefix`` choose by hand (``--weights-key``, ``--weights-prefix``); what was chosen is said.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConvscopeError

NESTED = ("state_dict", "model", "model_state_dict")
WRAPPERS = ("state_dict_ema", "model_ema", "ema", *NESTED)  # in the order they are tried: EMA first, as timm does
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


def read_state_dict(path: str | Path, obj=None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped and with wrapper prefixes removed (see the module doc); ``obj``:
    the file as :func:`read_weights_file` read it already."""
    path = Path(path)
    obj = read_weights_file(path) if obj is None else obj
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


@dataclass(frozen=True)
class Found:
    """The state dict found in a weights file for a model: under which wrapper ``key`` ("" for the top level),
    with which ``prefix`` stripped (besides DataParallel's and torch.compile's), and how many of the file's
    tensors under that key were left out (those outside the prefix)."""

    state: dict[str, torch.Tensor]
    key: str
    prefix: str
    left: int = 0

    def note(self) -> str | None:
        """What was chosen, for the user to read; None for a plain state dict at the top level."""
        parts = []
        if self.key:
            parts.append(f"the weights under {self.key!r}")
        if self.prefix:
            parts.append(f"with the prefix {self.prefix!r} stripped"
                         + (f" ({self.left} other tensors of the file left out)" if self.left else ""))
        return ", ".join(parts) or None


def read_weights_file(path: str | Path):
    """What a weights file holds, as read (a state dict, or a checkpoint's mapping around one); read it once and
    hand it to :func:`read_state_dict` and :func:`find_weights`."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConvscopeError(f"weights file {str(path)!r} {what}")
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)


def _tensors(obj) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}


def _fitting_prefixes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every prefix whose keys, stripped, fit ``model`` exactly (one of the model's keys is enough to find them)."""
    own = list(model.state_dict())
    if not own:
        return []
    first = own[0]
    found = [k[: len(k) - len(first)] for k in state if k.endswith("." + first)]
    return [prefix for prefix in dict.fromkeys(found) if mismatch(model, _under(state, prefix)) is None]


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose keys start with ``prefix``, the prefix stripped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def find_weights(model: nn.Module, path: str | Path, key: str | None = None, prefix: str | None = None,
                 obj=None) -> Found:
    """The state dict in ``path`` that fits ``model`` exactly, found as the module doc says; ``key`` and
    ``prefix`` choose by hand; ``obj``: the file as :func:`read_weights_file` read it already. Nothing is loaded:
    :func:`fit` the result's ``state``."""
    path = Path(path)
    obj = read_weights_file(path) if obj is None else obj
    keys = [k for k in WRAPPERS if isinstance(obj, Mapping) and _tensors(obj.get(k))]
    if key is not None:
        if key and not (isinstance(obj, Mapping) and _tensors(obj.get(key))):
            have = [str(k) for k, v in obj.items() if _tensors(v)] if isinstance(obj, Mapping) else []
            raise ConvscopeError(f"{str(path)!r} has no state dict under {key!r}; its state dicts are under: "
                                 f"{', '.join(have) or 'none'}{' and the top level' if _tensors(obj) else ''}")
        keys = [key]
    elif _tensors(obj):
        keys = [*keys, ""]
    if not keys:
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else "mapping with no tensors"
        raise ConvscopeError(f"{str(path)!r} holds a {kind}, not a state dict; save model.state_dict() "
                             f"(torch.save(model.state_dict(), path)), or one under {' or '.join(WRAPPERS)}")
    first_problem = None
    for k in keys:
        state = _strip_prefixes(_tensors(obj[k] if k else obj))
        if prefix is not None:
            sub = _under(state, prefix)
            problem = mismatch(model, sub) if sub else f"no key starts with {prefix!r}"
            if problem is None:
                return Found(sub, k, prefix, len(state) - len(sub))
            first_problem = first_problem or (k, problem)
            continue
        if mismatch(model, state) is None:
            return Found(state, k, "")
        fitting = _fitting_prefixes(model, state)
        if len(fitting) > 1:
            where = f" under {k!r}" if k else ""
            raise ConvscopeError(f"several parts of {str(path)!r}{where} fit the model: the keys under the prefixes "
                                 f"{', '.join(repr(p) for p in fitting)}; choose one with --weights-prefix")
        if fitting:
            sub = _under(state, fitting[0])
            return Found(sub, k, fitting[0], len(state) - len(sub))
        first_problem = first_problem or (k, mismatch(model, state))
    k, problem = first_problem
    heads = {}
    for n in _strip_prefixes(_tensors(obj[k] if k else obj)):
        head = n.split(".", 1)[0] + "." if "." in n else n
        heads[head] = heads.get(head, 0) + 1
    starts = ", ".join(f"{h} ({c})" for h, c in sorted(heads.items(), key=lambda x: -x[1])[:6])
    raise ConvscopeError(f"the weights in {str(path)!r}{f' under {k!r}' if k else ''} do not fit the model "
                         f"({problem}); the file's keys start with {starts}. Check that the model spec and its "
                         "arguments (--model-arg) build the network the weights were saved from, or choose the "
                         "part of the file with --weights-key / --weights-prefix")


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


def load_weights(model: nn.Module, path: str | Path, key: str | None = None, prefix: str | None = None) -> Found:
    """Find the weights in ``path`` that fit ``model`` (:func:`find_weights`) and load them, completely or not at
    all. Returns what was found."""
    found = find_weights(model, path, key, prefix)
    fit(model, found.state, path)
    return found


__all__ = ["Found", "find_weights", "fit", "load_weights", "mismatch", "read_state_dict", "read_weights_file",
           "sha256", "state_sha256"]
