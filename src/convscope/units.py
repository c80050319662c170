"""Paper Fig. 2: each unit's top-k activations over a data set, projected to pixels beside the image patches
(the unit's receptive field in each image).

:func:`unit_views` computes the projections and patches for some units of one layer from a :class:`TopK`
scan (one forward and one backward pass per chunk of images, every image with its own target map);
:func:`unit_tile` and :func:`layer_grid` turn them into pictures. Over a run, :func:`compute` scans a split
(resuming an interrupted scan) and draws some units of every layer, and :func:`write_scan` writes the scan,
each layer's panel and each unit's tile.
Projections and patches are cropped to each unit's receptive field and placed on a canvas the size of the
largest field of the layer, so the 3x3 blocks line up; where a field is clipped by the image border, the crop
sits against the side it was clipped on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import artifacts
from .data import seeded_subset
from .deconvnet import RULES, Projector
from .errors import ConvscopeError, check_int, check_seed, unknown
from .forward import eval_mode, input_channels, run_to
from .imaging import caption, make_grid, to_image, upscale
from .layers import site
from .layout import Layout
from .receptive_field import receptive_field
from .topk import TopK, save_topk, scan

if TYPE_CHECKING:
    from .run import Run


@dataclass
class UnitViews:
    """Per unit u and rank j: ``projections[u, j]`` and ``patches[u, j]`` (3, h, w) crops, ``boxes[u, j]`` the
    receptive field (y0, x0, y1, x1), ``values`` and ``images`` from the scan."""

    layer: str
    units: torch.Tensor
    values: torch.Tensor
    images: torch.Tensor
    boxes: torch.Tensor
    projections: torch.Tensor
    patches: torch.Tensor


def select_units(n_channels: int, n: int | None, seed: int = 0) -> torch.Tensor:
    """All units (``n`` None or >= ``n_channels``), or a seeded random subset of ``n``, in ascending order."""
    return torch.arange(n_channels) if n is None else seeded_subset(n_channels, n, seed)


def _place(crop: torch.Tensor, box, image_hw, canvas_hw, fill: float) -> torch.Tensor:
    h, w = canvas_hw
    box = tuple(box)
    out = torch.full((crop.shape[0], h, w), fill, dtype=crop.dtype)
    ch, cw = crop.shape[-2:]
    top = h - ch if (box[0] == 0 and box[2] < image_hw[0]) else 0  # clipped at the top: sit at the bottom
    left = w - cw if (box[1] == 0 and box[3] < image_hw[1]) else 0
    out[:, top:top + ch, left:left + cw] = crop[:, :h, :w]
    return out


def field_size(model: nn.Module, layer: str, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The side of a unit's receptive field where the border does not clip it (measured at the centre of an
    image four times larger), capped at the image: the canvas every crop of the layer is placed on."""
    big = (4 * image_hw[0], 4 * image_hw[1])
    param = next(model.parameters())
    x = torch.zeros(1, input_channels(model) or 3, *big, dtype=param.dtype, device=param.device)
    with torch.no_grad(), eval_mode(model):
        h, w = run_to(model, site(model, layer), x).shape[-2:]
    box = receptive_field(model, layer, (h // 2, w // 2), input_size=big)
    return min(box.y1 - box.y0, image_hw[0]), min(box.x1 - box.x0, image_hw[1])


def unit_views(model: nn.Module, data, topk: TopK, layer: str, units=None, rule: str = "deconvnet",
               batch_size: int = 64, nonlinearities: str = "error") -> UnitViews:
    """Fig. 2 for ``units`` (default all) of ``layer``: each of their top-k images projected from the unit's
    strongest activation in it (paper section 2.1), and the image patch under that activation."""
    if layer not in topk.values:
        raise ConvscopeError(f"the scan has no layer {layer!r}; scanned layers: {', '.join(topk.layers)}")
    units = torch.as_tensor(select_units(topk.values[layer].shape[0], None) if units is None else units).long()
    images_idx, positions = topk.images[layer][units], topk.positions[layer][units]
    if (images_idx < 0).any():
        raise ConvscopeError("the scan saw fewer images than k: scan more images")
    flat_idx = images_idx.reshape(-1)
    boxes, projections, patches = _crops(
        model, layer, lambda a, b: data.batch(flat_idx[a:b])[0], units.repeat_interleave(images_idx.shape[1]),
        positions.reshape(-1, 2), rule, nonlinearities, batch_size)
    k = images_idx.shape[1]
    return UnitViews(layer, units, topk.values[layer][units], images_idx, boxes.view(-1, k, 4),
                     projections.view(-1, k, *projections.shape[1:]), patches.view(-1, k, *patches.shape[1:]))


def _crops(model: nn.Module, layer: str, fetch, channels: torch.Tensor, positions: torch.Tensor, rule: str,
           nonlinearities: str, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For M (image, channel, position) triples, ``fetch(a, b)`` giving images a..b: the receptive fields
    (M, 4) and the projections and patches cropped to them on the layer's canvas (M, 3, h, w). Each image is
    projected from its channel's strongest activation, which the triple's position is."""
    x0 = fetch(0, 1)
    with torch.no_grad(), eval_mode(model):
        act = run_to(model, site(model, layer), x0)
    if act.dim() != 4:
        raise ConvscopeError(f"layer {layer!r} has no spatial map, so its units have no image patches: "
                             "Fig. 2 needs a convolutional layer (use Projector.project for fc units)")
    size = tuple(x0.shape[-2:])
    flat_pos = [tuple(p) for p in positions.tolist()]
    distinct = sorted(set(flat_pos))
    box_of = dict(zip(distinct, receptive_field(model, layer, distinct, input_size=size)))
    boxes = torch.tensor([list(box_of[p]) for p in flat_pos], dtype=torch.long).view(-1, 4)
    canvas = field_size(model, layer, size)
    projector = Projector(model, rule, nonlinearities)
    projections, patches = [], []
    for start in range(0, len(flat_pos), batch_size):
        imgs = fetch(start, start + batch_size)
        proj = projector.project(imgs, layer, channel=channels[start:start + batch_size]).detach().cpu()
        for j in range(len(imgs)):
            b = box_of[flat_pos[start + j]]
            y0, x0_, y1, x1 = b
            projections.append(_place(proj[j, :, y0:y1, x0_:x1], b, size, canvas, 0.0))
            patches.append(_place(imgs[j, :, y0:y1, x0_:x1].cpu(), b, size, canvas, 0.5))
    return boxes, torch.stack(projections), torch.stack(patches)


def unit_tile(views: UnitViews, u: int, min_side: int = 40) -> np.ndarray:
    """One unit as the paper shows it: its top-9 projections (3x3, each contrast-normalised on its own, grey =
    0) beside the 3x3 image patches. uint8 (H, W, 3)."""
    k = views.projections.shape[1]
    nrow = math.ceil(math.sqrt(k))
    proj = [upscale(im, min_side) for im in to_image(views.projections[u])]
    patch = [upscale(im, min_side) for im in
             (views.patches[u].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    left, right = make_grid(proj, nrow=nrow, pad=1), make_grid(patch, nrow=nrow, pad=1)
    gap = np.full((left.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def layer_grid(views: UnitViews, ncol: int = 4, min_side: int = 40) -> np.ndarray:
    """All units of a UnitViews as one picture, like one layer's panel of Fig. 2."""
    tiles = [unit_tile(views, u, min_side) for u in range(len(views.units))]
    return make_grid(tiles, nrow=ncol, pad=6, fill=255)


def class_agreement(topk: TopK, labels: torch.Tensor, layer: str) -> tuple[float, float]:
    """How often two of a unit's top-k images share a class, averaged over units, and what chance gives (the
    same for labels drawn at random with the data set's class frequencies). Fig. 2's claim that upper-layer
    units are class-specific, as a number."""
    idx = topk.images[layer]
    lab = labels[idx.clamp_min(0)]
    k = idx.shape[1]
    same = (lab[:, :, None] == lab[:, None, :]).float().sum((1, 2)) - k
    agreement = (same / (k * (k - 1))).mean().item()
    freq = torch.bincount(labels).double() / len(labels)
    return agreement, float((freq * freq).sum())


def mask_energy(projections: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """The share of projection energy (sum of squares over channels) that falls inside the object masks, and
    the masks' share of the image: projections (N, 3, H, W), masks (N, H, W) bool. The deconvnet should show
    the discriminative structure, so on the synthetic data its energy should lie on the object."""
    energy = projections.detach().float().pow(2).sum(1)
    inside = (energy * masks).sum((1, 2)) / energy.sum((1, 2)).clamp_min(1e-30)
    alive = energy.sum((1, 2)) > 0
    return inside[alive].mean().item(), masks.float().mean().item()


# --------------------------------------------------------------------------------------- one image's maps


@dataclass
class ProjectionSheet:
    """Many maps of some images (``convscope project``): for image i and its j-th map, ``channels[i, j]``, the
    map's strongest activation ``values[i, j]`` at ``positions[i, j]`` (row, col), its receptive field
    ``boxes[i, j]`` (y0, x0, y1, x1), and the projection and image patch cropped to it (3, h, w)."""

    layer: str
    names: list[str]
    channels: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    boxes: torch.Tensor
    projections: torch.Tensor
    patches: torch.Tensor
    rule: str
    nonlinearities: str


def project_images(model: nn.Module, images: torch.Tensor, layer: str, channels=None, rule: str = "deconvnet",
                   nonlinearities: str = "error", names: list[str] | None = None) -> ProjectionSheet:
    """Project maps of ``layer`` in each of ``images`` (N, C, H, W) from their strongest activation (paper
    section 2.1), with the image patch under it: the maps ``channels`` (a sequence, the same for every image),
    or, for None, each image's strongest map."""
    with torch.no_grad(), eval_mode(model):
        act = run_to(model, site(model, layer), images).detach().float()
    if act.dim() != 4:
        raise ConvscopeError(f"layer {layer!r} has no spatial map; name a layer with feature maps")
    n, c, _, w = act.shape
    flat = act.flatten(2)
    if channels is None:
        chans = (flat.flatten(1).argmax(1) // flat.shape[2]).view(n, 1)
    else:
        if not list(channels):
            raise ConvscopeError("no maps named: give one or more channel numbers, or all")
        chans = torch.as_tensor(list(channels), dtype=torch.long).view(1, -1).expand(n, -1)
        bad = chans[(chans < 0) | (chans >= c)]
        if bad.numel():
            raise ConvscopeError(f"channel {int(bad[0])} out of range: layer {layer!r} has {c} maps (0..{c - 1})")
    maps = flat[torch.arange(n)[:, None], chans]  # (N, K, H*W)
    values, where = maps.max(2)
    positions = torch.stack([where // w, where % w], dim=-1)
    k = chans.shape[1]
    image_of = torch.arange(n).repeat_interleave(k)
    boxes, proj, patches = _crops(model, layer, lambda a, b: images[image_of[a:b]], chans.reshape(-1),
                                  positions.reshape(-1, 2), rule, nonlinearities)
    return ProjectionSheet(layer, names or [str(i) for i in range(n)], chans.clone(), values, positions,
                           boxes.view(n, k, 4), proj.view(n, k, *proj.shape[1:]), patches.view(n, k, *proj.shape[1:]),
                           rule, nonlinearities)


def sheet_picture(sheet: ProjectionSheet, min_side: int = 48) -> np.ndarray:
    """One row per image, one column per map: each cell the projection above the image patch under it."""
    cells = []
    for i in range(sheet.projections.shape[0]):
        proj = to_image(sheet.projections[i])
        patch = (sheet.patches[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for p, q in zip(proj, patch):
            top, bottom = upscale(p, min_side), upscale(q, min_side)
            cells.append(np.concatenate([top, np.full((2, top.shape[1], 3), 255, np.uint8), bottom], axis=0))
    picture = make_grid(cells, nrow=sheet.projections.shape[1], pad=4, fill=255)
    return caption(picture, gradient_note(sheet.rule, sheet.nonlinearities))


def write_sheet(sheet: ProjectionSheet, out: str | Path) -> list[Path]:
    """The picture (``out``, PNG) and its numbers beside it (``out`` with ``.json``)."""
    out = Path(out)
    numbers = {"layer": sheet.layer, "rule": sheet.rule, "nonlinearities": sheet.nonlinearities,
               "images": [{"image": name, "maps": [
                   {"channel": int(c), "value": float(v), "position": p, "box": b}
                   for c, v, p, b in zip(sheet.channels[i].tolist(), sheet.values[i].tolist(),
                                         sheet.positions[i].tolist(), sheet.boxes[i].tolist())]}
                          for i, name in enumerate(sheet.names)]}
    return [artifacts.save_image(out, sheet_picture(sheet)), artifacts.write_json(out.with_suffix(".json"), numbers)]


# ------------------------------------------------------------------------------------------------- a run


def gradient_note(rule: str, nonlinearities: str) -> str | None:
    """What a figure must say when its projections passed nonlinearities other than ReLU by their gradient."""
    if nonlinearities == "gradient" and rule != "gradient":
        return f"{rule}: nonlinearities other than ReLU passed by their gradient (--nonlinearities gradient)"
    return None


@dataclass
class ScanResult:
    """Fig. 2 over a run: the scan of one split (``topk``) and the drawn units of every layer (``views``)."""

    topk: TopK
    split: str
    views: dict[str, UnitViews]
    rule: str
    nonlinearities: str


def compute(run: Run, layers: list[str] | None = None, k: int = 9, split: str | None = None, units: int = 16,
            seed: int = 0, rule: str = "deconvnet", progress: bool | None = None) -> ScanResult:
    """Fig. 2: scan ``split`` for the top-``k`` of every map of ``layers`` (resuming an interrupted scan from
    the run's scan state), then project the top-k of ``units`` seeded units per layer (0: all)."""
    if rule not in RULES:
        raise unknown("rule", rule, RULES)
    check_int(units, "units (0 for all)", 0)
    check_seed(seed)
    layers = run.check_layers(list(layers)) if layers is not None else run.map_layers()
    split = split or run.default_split("val")
    data = run.split(split)
    # A model the rule cannot project fails here, before the scan rather than after it.
    Projector(run.model, rule, run.nonlinearities).project(data.batch(torch.tensor([0]))[0], layers[-1])
    topk = scan(run.model, data, layers, k=k, state_path=run.layout.scan_state, progress=progress,
                identity={"split": split, "data": data.name, "model": run.fingerprint})
    views = {layer: unit_views(run.model, data, topk, layer, select_units(topk.values[layer].shape[0], units or None,
                                                                           seed), rule=rule,
                               nonlinearities=run.nonlinearities) for layer in layers}
    return ScanResult(topk, split, views, rule, run.nonlinearities)


def write_scan(result: ScanResult, layout: Layout, ncol: int = 4) -> list[Path]:
    """The scan (``scan/topk.safetensors``, which makes its resume state obsolete), each layer's panel
    (``fig2_<layer>.png``) and each drawn unit's tile."""
    meta = {"split": result.split, "rule": result.rule, "nonlinearities": result.nonlinearities}
    paths = [save_topk(layout.topk, result.topk, meta)]
    artifacts.remove(layout.scan_state)
    note = gradient_note(result.rule, result.nonlinearities)
    for layer, views in result.views.items():
        paths.append(artifacts.save_image(layout.layer_figure("fig2", layer), caption(layer_grid(views, ncol), note)))
        for u, unit in enumerate(views.units.tolist()):
            paths.append(artifacts.save_image(layout.unit(layer, unit), caption(unit_tile(views, u), note)))
    return paths


def summary(result: ScanResult) -> str:
    return (f"scanned {result.topk.seen} images of split {result.split!r}; drew "
            + ", ".join(f"{len(v.units)} units of {layer}" for layer, v in result.views.items()))
