"""Paper Fig. 4: how features evolve during training. For a subset of units per layer, the strongest
activation over the training examples (the paper uses all of them; convscope a seeded subset of ``n`` images
for speed) at each saved epoch (1, 2, 5, 10, 20, 30, 40, 64), projected to pixels and cropped to the receptive
field. Lower layers settle in a few epochs, upper ones only much later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import artifacts
from .errors import ConvscopeError
from .imaging import make_grid, to_image, upscale
from .topk import scan_shard
from .views import unit_views


@dataclass
class Evolution:
    """For one layer: ``projections[e, u]`` (3, h, w) of unit ``units[u]`` at ``epochs[e]``, from training image
    ``images[e, u]`` where its activation ``values[e, u]`` was strongest."""

    layer: str
    epochs: list[int]
    units: torch.Tensor
    images: torch.Tensor
    values: torch.Tensor
    projections: torch.Tensor


def evolution(models: dict[int, nn.Module], data, units: dict[str, torch.Tensor], indices=None,
              rule: str = "deconvnet", batch_size: int = 128) -> dict[str, Evolution]:
    """Fig. 4 for ``units`` (layer -> unit indices) over ``models`` (epoch -> model at that epoch), scanning
    the images ``indices`` of ``data`` (default all)."""
    if not models:
        raise ConvscopeError("no checkpoints: train with epochs covering 1, 2, 5, 10, ... to see evolution")
    indices = torch.arange(len(data)) if indices is None else torch.as_tensor(indices)
    epochs = sorted(models)
    per_layer: dict[str, list] = {layer: [] for layer in units}
    for epoch in epochs:
        model = models[epoch]
        top = scan_shard(model, data, indices, list(units), k=1, batch_size=batch_size)
        for layer, u in units.items():
            per_layer[layer].append(unit_views(model, data, top, layer, u, rule=rule))
    out = {}
    for layer, views in per_layer.items():
        out[layer] = Evolution(layer, epochs, torch.as_tensor(units[layer]),
                               torch.stack([v.images[:, 0] for v in views]),
                               torch.stack([v.values[:, 0] for v in views]),
                               torch.stack([v.projections[:, 0] for v in views]))
    return out


def evolution_grid(ev: Evolution, min_side: int = 32) -> np.ndarray:
    """Units down, epochs across, as in Fig. 4: uint8 (H, W, 3)."""
    e, u = ev.projections.shape[:2]
    tiles = to_image(ev.projections.transpose(0, 1).reshape(e * u, *ev.projections.shape[2:]))
    return make_grid([upscale(t, min_side) for t in tiles], nrow=e, pad=2)


def save_evolution(out_dir: str | Path, evolutions: dict[str, Evolution]) -> list[Path]:
    """Write ``fig4_<layer>.png`` per layer, ``evolution/<layer>/unit_NNNN.png`` (one strip of epochs per unit)
    and ``fig4.json`` (epochs, units, images, values)."""
    out_dir = Path(out_dir)
    paths = []
    for layer, ev in evolutions.items():
        paths.append(artifacts.save_image(out_dir / f"fig4_{layer}.png", evolution_grid(ev)))
        for u, unit in enumerate(ev.units.tolist()):  # one strip per unit, for the viewer's unit pages
            strip = make_grid([upscale(t, 32) for t in to_image(ev.projections[:, u])], nrow=len(ev.epochs), pad=2)
            paths.append(artifacts.save_image(out_dir / "evolution" / layer / f"unit_{unit:04d}.png", strip))
    summary_path = out_dir / "fig4.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}  # other layers' stay
    summary.update({layer: {"epochs": ev.epochs, "units": ev.units.tolist(), "images": ev.images.tolist(),
                            "values": ev.values.tolist()} for layer, ev in evolutions.items()})
    paths.append(artifacts.write_json(summary_path, summary))
    return paths
