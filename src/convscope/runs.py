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
    indices = select_units(len(data), n_images, seed)  # a seeded subset of training images
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


def _first(data, n: int) -> torch.Tensor:
    if n < 1:
        raise ConvscopeError(f"need at least one image, got n={n}")
    return torch.arange(min(n, len(data)))


def occlusion_run(run: Run, n: int = 5, split: str = "test", layer: str = "conv5", size: int | None = None,
                  stride: int | None = None, batch_size: int = 64) -> list[Path]:
    """Fig. 7 for the first ``n`` images of ``split``. Square and stride default to 3/16 and 1/16 of the image
    side (12 px and 4 px at 64 px; the paper does not state them)."""
    from .occlusion import occlusion, write_occlusion

    data = run.split(split)
    x, y = data.batch(_first(data, n))
    side = x.shape[-1]
    size = size if size is not None else max(2, round(side * 3 / 16))
    stride = stride if stride is not None else max(1, round(side / 16))
    results = [occlusion(run.model, x[i], int(y[i]), layer=layer, size=size, stride=stride, batch_size=batch_size)
               for i in range(len(x))]
    return write_occlusion(results, run.path / "figures", run.classes, name="fig7")


def invariance_run(run: Run, n: int = 5, split: str = "test", mode: str = "warp") -> list[Path]:
    """Fig. 5 for the first ``n`` images of ``split``: ``mode="warp"`` transforms the image (the paper),
    ``"render"`` re-renders the embedded data's object with the pose changed (no border artefacts)."""
    from .invariance import invariance, synthetic_renderer, write_invariance

    if mode not in ("warp", "render"):
        raise unknown("invariance mode", mode, ("warp", "render"))
    data = run.split(split)
    idx = _first(data, n)
    x, y = data.batch(idx)
    render = None
    if mode == "render":
        if run.config.data != "synthetic":
            raise ConvscopeError("mode 'render' re-renders the embedded synthetic data; this run was trained on "
                                 f"{run.config.data!r}: use mode 'warp'")
        render = synthetic_renderer(split, idx.tolist(), size=x.shape[-1], seed=run.config.seed,
                                    classes=run.config.classes)
    result = invariance(run.model, x, y, render=render)
    return write_invariance(result, run.path / "figures", run.classes, name="fig5" if mode == "warp" else "fig5_render")


def correspondence_run(run: Run, class_name: str = "face", parts=None, split: str = "test", draws: int = 10,
                       seed: int = 0, size: int | None = None, parts_json: str | Path | None = None) -> list[Path]:
    """Table 1: Delta for masked parts and random regions at conv5 and fc7, on 5 images of one class of the
    embedded data (their ground-truth part locations), or on the user's images and parts (``parts_json``)."""
    from .correspondence import FACE_PARTS, class_parts, correspondence, load_parts_json, write_correspondence

    if parts_json is not None:
        images = load_parts_json(parts_json, size=getattr(run.model, "input_size", None))
        parts = parts or list(images.parts)
    else:
        images = class_parts(run.split(split), class_name)
        parts = parts or list(FACE_PARTS)
    result = correspondence(run.model, images, parts=parts, draws=draws, seed=seed, size=size)
    return write_correspondence(result, run.path / "figures", name="table1")


def filters_run(run: Run, others=(), n_images: int = 16) -> list[Path]:
    """Fig. 6 over a run: conv1 filter grids and the numbers behind the paper's words (dead filters, frequency
    bands, dominance, layer-2 aliasing) for this run and the runs it is compared with: ``others`` (run
    directories), and the demo's ``compare/`` runs. Each compared run of fewer epochs is matched by this run's
    checkpoint at that epoch, so the comparison is like for like."""
    from .filters import compare, save_diagnosis

    paths = [Path(p) for p in others]
    if (run.path / "compare").is_dir():
        paths += sorted(p for p in (run.path / "compare").iterdir() if (p / CONFIG).is_file())
    models = {_label(run): run.model}
    for path in paths:
        other = open_run(path)
        epochs = other.config.epochs
        if epochs < run.config.epochs and epochs in run.checkpoints:
            models[f"{_label(run)} (epoch {epochs})"] = load_model(run.checkpoints[epochs])[0]
        models[_label(other)] = other.model
    images = run.split("val").batch(torch.arange(min(n_images, len(run.split("val")))))[0]
    return save_diagnosis(run.path / "figures", compare(models, images))


def _label(run: Run) -> str:
    return f"{run.config.model}{'' if run.config.renorm else ' no renorm'} ({run.config.epochs} ep)"
