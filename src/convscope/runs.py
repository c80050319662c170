"""A training run directory as the analyses see it: its model, its data, its checkpoints; and the entry points
that run an analysis over a run and write its artifacts (the analyses themselves only compute).

Layout written here, beside what training writes (see train.py):
``scan/topk.safetensors`` (Fig. 2's scan), ``figures/fig2_<layer>.png`` and ``figures/units/<layer>/`` (Fig. 2),
``figures/fig4_<layer>.png`` (Fig. 4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from . import artifacts
from .checkpoint import load_model
from .config import TrainConfig
from .data import ImageSet, Splits
from .errors import ConvscopeError, unknown
from .train import CONFIG, FINAL, load_data

PAPER_CONV = ("conv1", "conv2", "conv3", "conv4", "conv5")
SPLITS = ("train", "val", "test")


@dataclass
class Run:
    """A finished training run: ``model`` (final weights, eval mode), ``config``, ``classes``."""

    path: Path
    config: TrainConfig
    model: nn.Module
    classes: list[str]
    _splits: Splits | None = field(default=None, repr=False)

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = load_data(self.config)
        return self._splits

    def split(self, name: str) -> ImageSet:
        if name not in SPLITS:
            raise unknown("split", name, SPLITS)
        return getattr(self.splits, name)

    @cached_property
    def checkpoints(self) -> dict[int, Path]:
        """Epoch -> weights file of the paper's Fig. 4 epochs that the run saved."""
        files = sorted((self.path / "checkpoints").glob("epoch_*.safetensors"))
        return {int(f.stem.split("_")[1]): f for f in files}

    def conv_layers(self) -> list[str]:
        names = [n for n in PAPER_CONV if n in getattr(self.model, "paper_layers", {})]
        if not names:
            raise ConvscopeError("this model has no paper layer names: pass the layers to analyse explicitly")
        return names


def open_run(path: str | Path) -> Run:
    """Open a finished run directory; a directory that is not one gets a message saying what is missing."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise ConvscopeError(f"{str(path)!r} is not a convscope run (no {CONFIG}); train one with `convscope train`")
    if not (path / FINAL).is_file():
        raise ConvscopeError(f"the run {str(path)!r} has not finished training (no {FINAL}); run the same "
                             "`convscope train` command again to resume it")
    config = TrainConfig.from_dict(json.loads((path / CONFIG).read_text()))
    model, info = load_model(path / FINAL)
    return Run(path, config, model, info["classes"])


def scan_run(run: Run, layers=None, k: int = 9, split: str = "val", units: int | None = 16, seed: int = 0,
             rule: str = "deconvnet", batch_size: int = 128, progress: bool | None = None) -> list[Path]:
    """Fig. 2 over a run: scan ``split`` for the top-``k`` of every map of ``layers`` (resuming an interrupted
    scan), then project the top-k of ``units`` units per layer (a seeded random subset; None for all)."""
    from .topk import save_topk, scan
    from .views import save_views, select_units, unit_views

    layers = list(layers or run.conv_layers())
    data = run.split(split)
    state = run.path / "scan" / "state.pt"
    topk = scan(run.model, data, layers, k=k, batch_size=batch_size, state_path=state, progress=progress)
    paths = [save_topk(run.path / "scan" / "topk.safetensors", topk, {"split": split})]
    artifacts.remove(state)
    for layer in layers:
        chosen = select_units(topk.values[layer].shape[0], units, seed)
        views = unit_views(run.model, data, topk, layer, chosen, rule=rule)
        paths += save_views(run.path / "figures", views)
    return paths


def evolution_run(run: Run, layers=None, units: int = 8, n_images: int = 2000, seed: int = 0,
                  rule: str = "deconvnet") -> list[Path]:
    """Fig. 4 over a run: ``units`` seeded units per layer, their strongest activation over ``n_images``
    training images at every saved epoch."""
    from .evolution import evolution, save_evolution
    from .views import select_units

    if not run.checkpoints:
        raise ConvscopeError(f"the run {str(run.path)!r} saved no epoch checkpoints (epochs 1, 2, 5, 10, ...)")
    layers = list(layers or run.conv_layers())
    data = run.split("train")
    g = torch.Generator().manual_seed(seed)
    indices = torch.sort(torch.randperm(len(data), generator=g)[:n_images]).values
    models = {epoch: load_model(path)[0] for epoch, path in run.checkpoints.items()}
    chosen = {}
    for layer in layers:
        n_channels = _channels(run.model, layer, data)
        chosen[layer] = select_units(n_channels, units, seed)
    return save_evolution(run.path / "figures", evolution(models, data, chosen, indices, rule=rule))


def _channels(model: nn.Module, layer: str, data) -> int:
    from .deconvnet import eval_mode, run_to
    from .layers import resolve_layer

    with torch.no_grad(), eval_mode(model):
        return run_to(model, resolve_layer(model, layer)[1], data.batch(torch.tensor([0]))[0]).shape[1]
