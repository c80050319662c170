"""Invariance to translation, scale and rotation (paper section 4.2, Fig. 5).

A few images are transformed step by step: vertical translation, scale (1 to 1.8) and rotation (0 to 350
degrees). At each step convscope measures, per image, the Euclidean distance between the feature vectors of
the original and the transformed image at layer 1 (conv1) and layer 7 (fc7), and the probability of the true
label.

Distances: the paper plots raw Euclidean distances. Layers differ in size and scale (conv1 has 32x32x32 values
at 64 px, fc7 256), so convscope reports ``distance = ||f(x) - f(x')|| / ||f(x)||``, the relative distance
(0: unchanged; 1: as far as the feature vector is long), which compares layers directly, and keeps the raw
``||f(x) - f(x')||`` beside it. Both come from the same forward pass.

Two ways to transform (``render``):

- ``None`` (any data): the image is warped with ``affine_grid`` / ``grid_sample`` (bilinear) about the image
  centre; pixels that come from outside the image take ``fill`` (default: the data's mean colour, as the
  occluder of Fig. 7), so a translated or rotated image shows grey borders, as the paper's did;
- a renderer (the embedded data, :func:`synthetic_renderer`): the object is drawn again with its pose changed,
  about its own centre, over the unchanged background: no border, nothing but the object moves.

Translations default to ``-H/4..H/4`` pixels (-16..16 at 64 px; the paper's -60..60 at 224 px is about a
quarter of the image), in steps of H/32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import artifacts
from .analyses import SPLIT_HELP, Analysis, figure_files, register
from .data import SYNTHETIC
from .data.synthetic import render_pose
from .errors import ConvscopeError, unknown
from .findings import Finding, finding, paired_contrast
from .forward import check_images, eval_mode, run_to_all
from .imaging import make_grid
from .layers import site
from .layout import Layout
from .occluders import as_fill

if TYPE_CHECKING:
    from .run import Run

TRANSFORMS = ("translation", "scale", "rotation")

Renderer = Callable[[int, float, float, float, float], torch.Tensor]
"""``render(i, dx, dy, scale, rotation)``: image ``i`` with its object moved ``dx``, ``dy`` pixels, scaled and
rotated (degrees, counter-clockwise on screen) about its own centre; a (C, H, W) float tensor in [0, 1]."""


@dataclass
class InvarianceCurves:
    """One row of Fig. 5. ``distance`` and ``raw_distance`` map each layer to (N, T): image by step."""

    transform: str  # one of TRANSFORMS
    values: torch.Tensor  # (T,) pixels down / scale factor / degrees counter-clockwise
    distance: dict[str, torch.Tensor]  # ||f(x) - f(x')|| / ||f(x)||
    raw_distance: dict[str, torch.Tensor]  # ||f(x) - f(x')||, what the paper plots
    prob: torch.Tensor  # (N, T) probability of the true label
    examples: torch.Tensor  # (N, C, H, W) image i transformed by a value spread over the range (column 1)


@dataclass
class InvarianceResult:
    """Paper Fig. 5: the three transforms' curves for the same images (``classes``: the model's class names)."""

    layers: tuple[str, ...]
    labels: torch.Tensor  # (N,)
    mode: str  # "warp" or "render"
    curves: dict[str, InvarianceCurves]
    classes: list[str] | None = None


def warp(images: torch.Tensor, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0, rotation: float = 0.0,
         fill=0.0) -> torch.Tensor:
    """Images (N, C, H, W) moved ``dx``, ``dy`` pixels (right, down), scaled by ``scale`` and rotated
    ``rotation`` degrees counter-clockwise on screen, both about the image centre; bilinear; pixels from outside
    take ``fill`` (a number or one value per channel). ``rotation=90`` equals ``torch.rot90(x, 1, (-2, -1))``.
    """
    n, c, h, w = images.shape
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    a = math.radians(rotation)
    cos, sin = math.cos(a), math.sin(a)
    # Forward map in pixels (y down): out = s R (in - centre) + centre + t, R turning counter-clockwise on
    # screen. affine_grid wants the inverse, in coordinates normalised per axis (S = diag(2/W, 2/H)).
    inverse = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64) / scale
    s = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)
    b = inverse * s[:, None] / s[None, :]
    shift = -b @ (s * torch.tensor([dx, dy], dtype=torch.float64))
    theta = torch.cat([b, shift[:, None]], 1).to(images).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    # Sampling ``images - fill`` with zero padding makes the exposed border exactly ``fill``.
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _pose(transform: str, value: float) -> tuple[float, float, float, float]:
    """(dx, dy, scale, rotation) of one step."""
    if transform == "translation":
        return 0.0, value, 1.0, 0.0
    if transform == "scale":
        return 0.0, 0.0, value, 0.0
    return 0.0, 0.0, 1.0, value


def _values(values, default: torch.Tensor, name: str) -> torch.Tensor:
    values = default if values is None else torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0 or not torch.isfinite(values).all():
        raise ConvscopeError(f"{name} must be a non-empty list of finite numbers")
    if name == "scales" and (values <= 0).any():
        raise ConvscopeError("scales must be positive")
    return values


def invariance(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[str] = ("conv1", "fc7"),
    translations=None,
    scales=None,
    rotations=None,
    fill=None,
    render: Renderer | None = None,
) -> InvarianceResult:
    """Paper Fig. 5 for ``images`` (N, C, H, W) with true ``labels`` (N,): per transform and step, the distance
    of each layer's feature vector from the original's, and p(true label). ``translations`` (pixels down),
    ``scales`` and ``rotations`` (degrees) are the steps (defaults: -H/4..H/4 in steps of H/32; 1 to 1.8 in
    steps of 0.1; 0 to 350 in steps of 10). ``render`` re-renders instead of warping (see the module doc).
    The model's output is read as logits.
    """
    check_images(model, images)
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(labels) != len(images):
        raise ConvscopeError(f"got {len(images)} images but {len(labels)} labels")
    layers = tuple(layers)
    if not layers:
        raise ConvscopeError("invariance needs at least one layer")
    modules = [site(model, layer) for layer in layers]
    h = images.shape[-2]
    half, step = round(h / 4), max(1, round(h / 32))
    steps = {
        "translation": _values(translations, torch.arange(-half, half + 1, step, dtype=torch.float64),
                               "translations"),
        "scale": _values(scales, torch.linspace(1.0, 1.8, 9, dtype=torch.float64), "scales"),
        "rotation": _values(rotations, torch.arange(0.0, 351.0, 10.0, dtype=torch.float64), "rotations"),
    }
    images = images.detach()
    fill = as_fill(fill, model, images)

    def transformed(transform: str, value: float) -> torch.Tensor:
        dx, dy, s, r = _pose(transform, value)
        if render is None:
            return warp(images, dx, dy, s, r, fill)
        return torch.stack([render(i, dx, dy, s, r) for i in range(len(images))]).to(images)

    def features(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        *acts, logits = run_to_all(model, [*modules, model], x)
        rows = torch.arange(len(x))
        return [a.flatten(1).double() for a in acts], logits.softmax(-1)[rows, labels]

    curves = {}
    with eval_mode(model), torch.inference_mode():
        base, _ = features(images)
        for transform, values in steps.items():
            dist: list[list[torch.Tensor]] = [[] for _ in layers]
            probs, shown = [], []
            for value in values.tolist():
                x = transformed(transform, value)
                feats, p = features(x)
                for k, (f, f0) in enumerate(zip(feats, base)):
                    dist[k].append((f - f0).norm(dim=1))
                probs.append(p)
                shown.append(x)
            spread = torch.linspace(0, len(values) - 1, len(images)).round().long()
            raw = {layer: torch.stack(d, 1).float() for layer, d in zip(layers, dist)}
            norms = {layer: f0.norm(dim=1, keepdim=True).float() for layer, f0 in zip(layers, base)}
            curves[transform] = InvarianceCurves(
                transform=transform, values=values.float(),
                distance={layer: raw[layer] / norms[layer].clamp_min(1e-12) for layer in layers},
                raw_distance=raw, prob=torch.stack(probs, 1),
                examples=torch.stack([shown[int(t)][i] for i, t in enumerate(spread)]),
            )
    return InvarianceResult(layers=layers, labels=labels, mode="warp" if render is None else "render",
                            curves=curves)


def synthetic_renderer(split: str, indices: Sequence[int], size: int = 64, seed: int = 0,
                       classes: list[str] | None = None, fixed_parts: bool = False) -> Renderer:
    """A :data:`Renderer` over images ``indices`` of the embedded data set (``render_pose``): the object is
    re-rendered with its pose changed, with no border artefacts."""

    indices = [int(i) for i in indices]

    def render(i: int, dx: float, dy: float, scale: float, rotation: float) -> torch.Tensor:
        image, _ = render_pose(split, indices[i], size=size, seed=seed, dx=dx, dy=dy, scale=scale,
                               rotation=rotation, classes=classes, fixed_parts=fixed_parts)
        return image.float() / 255.0

    return render


_AXES = {"translation": "vertical translation (pixels)", "scale": "scale", "rotation": "rotation (degrees)"}


def invariance_figure(result: InvarianceResult, classes: Sequence[str] | None = None, raw: bool = False):
    """A matplotlib figure like paper Fig. 5: rows translation, scale, rotation; columns the example images,
    the layer-1 distance, the layer-7 distance (the first and last of ``result.layers``) and p(true label);
    one line per image. ``raw=True`` plots raw Euclidean distances (as the paper), else relative ones."""
    from matplotlib.figure import Figure


    fig = Figure(figsize=(18, 10))
    axes = fig.subplots(len(result.curves), 4, squeeze=False)
    first, last = result.layers[0], result.layers[-1]
    names = [classes[k] if classes is not None and k < len(classes) else str(k) for k in result.labels.tolist()]
    for row, (transform, c) in zip(axes, result.curves.items()):
        tiles = (c.examples.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        row[0].imshow(make_grid(tiles, nrow=len(tiles)))
        row[0].set_xticks([])
        row[0].set_yticks([])
        row[0].set_title(f"{transform} ({result.mode})", fontsize=9)
        x = c.values.numpy()
        for ax, layer in ((row[1], first), (row[2], last)):
            d = c.raw_distance[layer] if raw else c.distance[layer]
            for i, line in enumerate(d.numpy()):
                ax.plot(x, line, marker=".", label=names[i])
            ax.set_ylabel(("" if raw else "relative ") + f"distance, {layer}", fontsize=9)
        for i, line in enumerate(c.prob.numpy()):
            row[3].plot(x, line, marker=".", label=names[i])
        row[3].set_ylim(-0.02, 1.02)
        row[3].set_ylabel("p(true label)", fontsize=9)
        for ax in row[1:]:
            ax.set_xlabel(_AXES[transform], fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][3].legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_invariance(result: InvarianceResult, layout: Layout, name: str = "fig5") -> list[Path]:
    """Write Fig. 5 (``<name>.png``, relative distances; ``<name>_render`` for re-rendered poses) and every number
    (``.json``) into the run's figures."""
    name = name if result.mode == "warp" else f"{name}_render"
    classes = result.classes
    png = artifacts.save_figure(layout.figure(name), invariance_figure(result, classes))
    labels = [classes[k] if classes is not None and k < len(classes) else k for k in result.labels.tolist()]
    data = {
        "figure": "Zeiler & Fergus Fig. 5", "mode": result.mode, "layers": list(result.layers), "labels": labels,
        "distance": "relative: ||f(x) - f(x')|| / ||f(x)||; raw_distance: ||f(x) - f(x')||",
        "curves": {t: {"values": c.values.tolist(), "prob": c.prob.tolist(),
                       "distance": {k: v.tolist() for k, v in c.distance.items()},
                       "raw_distance": {k: v.tolist() for k, v in c.raw_distance.items()}}
                   for t, c in result.curves.items()},
    }
    return [png, artifacts.write_json(layout.figure(name, ".json"), data)]


def compute(run: Run, n: int = 5, split: str | None = None, mode: str = "warp") -> InvarianceResult:
    """Fig. 5 for the first ``n`` images of ``split`` at layer 1 and layer 7 (conv1 and fc7, or the model's
    first stage and penultimate module): ``mode="warp"`` transforms the image (the paper), ``"render"``
    re-renders the embedded data's object with the pose changed (no border artefacts)."""
    if mode not in ("warp", "render"):
        raise unknown("invariance mode", mode, ("warp", "render"))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConvscopeError(f"n must be a positive whole number of images, got {n!r}")
    split = split or run.default_split("test")
    render = None
    if mode == "render" and (run.data is None or run.data.name not in SYNTHETIC or split == "all"):
        what = "an 'all' split" if split == "all" else f"data {getattr(run.data, 'name', 'in memory')!r}"
        raise ConvscopeError("mode 'render' re-renders the embedded synthetic data's objects (train, val or test); "
                             f"this run has {what}: use mode 'warp'")
    data = run.split(split)
    idx = torch.arange(min(n, len(data)))
    x = data.batch(idx)[0]
    labels, _ = run.targets(data, idx)
    if mode == "render":
        render = synthetic_renderer(split, idx.tolist(), size=x.shape[-1], seed=run.data.seed,
                                    classes=list(run.data.classes) if run.data.classes else None,
                                    fixed_parts=run.data.name == "synthetic-parts")
    paper = run.paper_names
    layers = ("conv1", "fc7") if {"conv1", "fc7"} <= set(paper) else (run.map_layers()[0], run.vector_layer())
    result = invariance(run.model, x, labels, layers=layers, render=render)
    result.classes = list(run.classes)
    return result


def findings(result: InvarianceResult, analysis: str | None = None) -> list[Finding]:
    """Zeiler & Fergus Fig. 5: layer 1 is not invariant to small translations, layer 7 much more so. Contrast: the
    relative feature distance at the first layer minus at the last, each image's mean over the translations of up
    to H/16 pixels (not 0), paired over images. ``analysis`` defaults to ``fig5`` (mode "warp") or
    ``fig5_render``; keys are ``<analysis>.translation``. Empty where the result has one layer or no such shift."""
    analysis = analysis or ("fig5" if result.mode == "warp" else f"fig5_{result.mode}")
    c = result.curves.get("translation")
    first, last = result.layers[0], result.layers[-1]
    if c is None or first == last:
        return []
    # Small shifts only: at a quarter of the image every layer changes, and the claim is about small changes.
    limit = c.examples.shape[-2] / 16
    small = (c.values != 0) & (c.values.abs() <= limit)
    if not small.any():
        return []
    a, b = c.distance[first][:, small].mean(1), c.distance[last][:, small].mean(1)
    shifts = f"{limit:g} px"
    how = "re-rendered object" if result.mode == "render" else "warped image"
    claim = (f"Layer 1 ({first}) is not invariant to small translations, layer 7 ({last}) much more so "
             f"(shifts of up to {shifts}, {how})")
    return [finding(f"{analysis}.translation", claim, "Zeiler & Fergus 2014, Fig. 5", analysis,
                    paired_contrast(a, b, unit="images"),
                    f"relative distance {first} - {last}, mean over shifts of up to {shifts}",
                    "layer 1 changes dramatically, layer 7 less (quasi-linear in the shift); plotted, no number",
                    f"{float(a.mean()):.2f} ({first}) vs {float(b.mean()):.2f} ({last})")]


register(Analysis(
    "invariance", "fig5", "Fig. 5", "Invariance to translation, scale and rotation",
    "Distance between the feature vectors of original and transformed images at layer 1 and layer 7, and "
    "the probability of the true label, as the image is translated, scaled and rotated.",
    files=figure_files("fig5", "", "_render"), compute=compute, findings=findings,
    write=write_invariance,
    help={"n": "How many images (the first of the split).", "split": SPLIT_HELP,
          "mode": "warp: translate, scale and rotate the image (the paper); render: re-render the embedded "
                  "data's object with the pose changed (no border artefacts)."}))


__all__ = ["TRANSFORMS", "InvarianceCurves", "InvarianceResult", "compute", "findings", "invariance",
           "invariance_figure", "synthetic_renderer", "warp", "write_invariance"]
