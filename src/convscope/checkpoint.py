"""Weights and training state on disk.

Weights are safetensors with the resolved config in the file's metadata, so one file rebuilds its model. The
full training state (weights, optimiser, scheduler, metrics) for resuming is a ``torch.save`` file that is only
ever loaded with ``weights_only=True``: loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import artifacts
from .errors import ConvscopeError, shown
from .models import create_model

FORMAT = "convscope-weights-1"


def save_weights(path: str | Path, model: nn.Module, config: dict[str, Any], epoch: int,
                 num_classes: int, classes: list[str]) -> Path:
    meta = {"format": FORMAT, "config": json.dumps(config), "epoch": str(epoch),
            "num_classes": str(num_classes), "classes": json.dumps(classes)}
    return artifacts.save_safetensors(path, model.state_dict(), meta)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a weights file; a missing, truncated or foreign file is a ConvscopeError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConvscopeError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConvscopeError(f"weights file {str(path)!r} is corrupt or truncated ({e}); "
                             "use another checkpoint or retrain") from e
    if meta.get("format") != FORMAT:
        raise ConvscopeError(f"{str(path)!r} is a safetensors file but not convscope weights (no config inside)")
    return tensors, meta


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a convscope weights file; returns the model (eval mode) and its metadata
    (``config``, ``epoch``, ``classes``)."""
    tensors, meta = read_weights(path)
    info = _metadata(path, meta)
    config = info["config"]
    model = create_model(config["model"], num_classes=info["num_classes"], **config.get("model_options", {}))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ConvscopeError(f"weights in {str(path)!r} do not fit model {config['model']!r}: {e}") from e
    return model.to(map_location).eval(), info


def _metadata(path: str | Path, meta: dict[str, str]) -> dict[str, Any]:
    """The metadata of a weights file, every entry checked: a damaged one names the file and the entry."""
    def damaged(what: str) -> ConvscopeError:
        return ConvscopeError(f"weights file {str(path)!r} has damaged metadata ({what}); use another checkpoint, or "
                              "train the run again")

    try:
        config, classes = json.loads(meta["config"]), json.loads(meta["classes"])
        num_classes, epoch = int(meta["num_classes"]), int(meta["epoch"])
    except KeyError as e:
        raise damaged(f"no {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise damaged(str(e)) from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise damaged(f"config is {shown(config)}, not a table naming the model")
    if not isinstance(config.get("model_options", {}), dict):
        raise damaged(f"model_options is {shown(config.get('model_options'))}")
    if not isinstance(classes, list) or len(classes) != num_classes or not all(isinstance(c, str) for c in classes):
        raise damaged(f"classes {shown(classes)} do not name {num_classes} classes")
    if epoch < 0:
        raise damaged(f"epoch {epoch}")
    return {"config": config, "epoch": epoch, "classes": classes, "num_classes": num_classes}


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    return artifacts.save_torch(path, state)


def load_state(path: str | Path, what: str = "training state") -> Any:
    """A ``torch.save`` file, read with ``weights_only=True``: damaged, or a pickle that would run code, is a
    ConvscopeError naming the file."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch's own notes about the pickle protocol of a damaged file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle, and for one it refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConvscopeError(f"{what} {str(path)!r} is damaged or not convscope's ({type(e).__name__}: {first:.200}); "
                             "delete it to start that step again, or start a new run") from None
