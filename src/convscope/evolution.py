"""Paper Fig. 4: how features evolve during training. For a subset of units per layer, the strongest
activation over the training examples (the paper uses all of them; convscope a seeded subset of ``n`` images
for speed) at each saved epoch (1, 2, 5, 10, 20, 30, 40, 64), projected to pixels and cropped to the receptive
field. Lower layers settle in a few epochs, upper ones only much later.

Over a run (:func:`compute`) the epochs are the run's own checkpoints (``convscope train`` keeps the paper's
epochs), or a folder of state dicts named by epoch (``checkpoints=``: the user's own training, attached).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import artifacts
from .analyses import LAYERS_HELP, RULE_HELP, Analysis, json_check, register
from .deconvnet import RULES, gradient_note
from .errors import ConvscopeError, check_int, check_seed, unknown
from .imaging import caption, make_grid, to_image, upscale
from .layout import Layout
from .panels import Panel, Picture
from .topk import scan_shard
from .views import select_units, unit_views

if TYPE_CHECKING:
    from .run import Run

WEIGHTS = (".safetensors", ".pt", ".pth", ".bin")


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
              rule: str = "deconvnet", batch_size: int = 128, nonlinearities: str = "error") -> dict[str, Evolution]:
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
            per_layer[layer].append(unit_views(model, data, top, layer, u, rule=rule, nonlinearities=nonlinearities))
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


@dataclass
class EvolutionResult:
    """Fig. 4 over a run: one :class:`Evolution` per layer."""

    layers: dict[str, Evolution]
    rule: str
    nonlinearities: str


def checkpoints_in(folder: str | Path) -> dict[int, Path]:
    """Epoch -> state dict file of a folder of weights files, the epoch being the last number in each name."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConvscopeError(f"checkpoint folder {str(folder)!r} {what}")
    found: dict[int, Path] = {}
    for f in sorted(folder.iterdir()):
        numbers = re.findall(r"\d+", f.stem)
        if f.suffix not in WEIGHTS or not numbers or f.name.startswith("."):
            continue
        epoch = int(numbers[-1])
        if epoch in found:
            raise ConvscopeError(f"two checkpoints of epoch {epoch} in {str(folder)!r}: {found[epoch].name}, {f.name}")
        found[epoch] = f
    if not found:
        raise ConvscopeError(f"no weights files ({', '.join(WEIGHTS)}) with an epoch number in their names in "
                             f"{str(folder)!r}")
    return dict(sorted(found.items()))


def compute(run: Run, layers: list[str] | None = None, units: int = 8, n_images: int = 2000, seed: int = 0,
            rule: str = "deconvnet", checkpoints: str | None = None) -> EvolutionResult:
    """Fig. 4: ``units`` seeded units per layer, their strongest activation over ``n_images`` seeded training
    images at every saved epoch (the run's checkpoints, or the state dicts in the folder ``checkpoints``)."""
    if rule not in RULES:
        raise unknown("rule", rule, RULES)
    check_int(units, "units", 1)
    check_int(n_images, "n_images", 1)
    check_seed(seed)
    files = checkpoints_in(checkpoints) if checkpoints is not None else run.checkpoints
    if not files:
        raise ConvscopeError(f"the run {str(run.path)!r} has no epoch checkpoints: Fig. 4 needs the weights at several "
                             "epochs of training. Pass --checkpoints DIR, a folder of state dicts named by epoch "
                             "(epoch_1.pth, epoch_5.pth, ...)")
    layers = run.check_layers(list(layers)) if layers is not None else run.map_layers()
    data = run.split(run.default_split("train"))
    indices = select_units(len(data), n_images, seed)  # a seeded subset of training images
    models = {epoch: run.model_at(path) for epoch, path in files.items()}
    chosen = {layer: select_units(run.channels(layer), units, seed) for layer in layers}
    result = evolution(models, data, chosen, indices, rule=rule, nonlinearities=run.nonlinearities)
    return EvolutionResult(result, rule, run.nonlinearities)


def write_evolution(result: EvolutionResult, layout: Layout) -> list[Path]:
    """Write ``fig4_<layer>.png`` per layer, one strip of epochs per unit, and ``fig4.json`` (epochs, units,
    images, values; other layers' entries already there are kept)."""
    note = gradient_note(result.rule, result.nonlinearities)
    paths = []
    for layer, ev in result.layers.items():
        paths.append(artifacts.save_image(layout.layer_figure("fig4", layer), caption(evolution_grid(ev), note)))
        for u, unit in enumerate(ev.units.tolist()):  # one strip per unit, for the viewer's unit pages
            strip = make_grid([upscale(t, 32) for t in to_image(ev.projections[:, u])], nrow=len(ev.epochs), pad=2)
            paths.append(artifacts.save_image(layout.evolution_strip(layer, unit), caption(strip, note)))
    summary_path = layout.figure("fig4", ".json")
    summary = artifacts.read_json(summary_path)  # other layers' stay; a damaged file is written anew
    summary = summary if isinstance(summary, dict) else {}
    summary.update({layer: {"epochs": ev.epochs, "units": ev.units.tolist(), "images": ev.images.tolist(),
                            "values": ev.values.tolist()} for layer, ev in result.layers.items()})
    paths.append(artifacts.write_json(summary_path, summary))
    return paths


def unit_panel(layout: Layout, layer: str, unit: int, query=None) -> Panel | None:
    """The unit's strip of epochs (Fig. 4), each labelled with its epoch from ``fig4.json`` (without labels where
    that file is damaged)."""
    strip = layout.evolution_strip(layer, unit)
    if not strip.is_file():
        return None
    saved = artifacts.read_json(layout.figure("fig4", ".json"))
    entry = saved.get(layer) if isinstance(saved, dict) else None
    epochs = entry.get("epochs") if isinstance(entry, dict) else None
    if not isinstance(epochs, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in epochs):
        epochs = None
    when = f"epochs {', '.join(map(str, epochs))}" if epochs else "the saved epochs"
    return Panel([Picture(strip, f"evolution of {layer} unit {unit}", "Fig. 4.",
                          f"The unit's strongest activation over training images at {when}, projected.",
                          id="evolution-img", labels=tuple(f"epoch {e}" for e in epochs or ()))])


register(Analysis(
    "evolution", "fig4", "Fig. 4", "Evolution of features during training",
    "Per layer, a few maps (rows) at the saved epochs (columns): the strongest activation over training "
    "images, projected. Lower layers settle in a few epochs, upper layers much later.",
    files=lambda layout: (list(layout.layer_figures("fig4").values()), []),
    compute=compute, write=write_evolution, per_layer=True, projects=True,
    help={"layers": LAYERS_HELP + " [conv1..conv5, or the model's stages]",
          "units": "Units per layer (a seeded subset).", "n_images": "Training images searched at each epoch.",
          "seed": "Seed of the units and images.", "rule": RULE_HELP,
          "checkpoints": "A folder of state dicts, one per epoch, the epoch a number in each file name "
                         "(epoch_5.pth, 10.safetensors). [the run's own epoch checkpoints]"},
    units=lambda layout: Layout.unit_files(layout.evolution), unit_panel=unit_panel,
    check=lambda layout: json_check(layout.figure("fig4", ".json"), lambda v: isinstance(v, dict) and all(
        isinstance(e, dict) and isinstance(e.get("epochs"), list) for e in v.values()))))
