"""Paper Fig. 2: each unit's top-k activations over a data set, projected to pixels beside the image patches
(the unit's receptive field in each image).

:func:`unit_views` computes the projections and patches for some units of one layer from a :class:`TopK`
scan (one forward and one backward pass per chunk of images, every image with its own target map);
:func:`unit_tile` and :func:`layer_grid` turn them into pictures; :func:`save_views` writes them.
Projections and patches are cropped to each unit's receptive field and placed on a canvas the size of the
largest field of the layer, so the 3x3 blocks line up; where a field is clipped by the image border, the crop
sits against the side it was clipped on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import artifacts
from .data import seeded_subset
from .deconvnet import Projector
from .errors import ConvscopeError
from .forward import eval_mode, input_channels, run_to
from .imaging import make_grid, to_image, upscale
from .layers import site
from .receptive_field import receptive_field
from .topk import TopK


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
               batch_size: int = 64) -> UnitViews:
    """Fig. 2 for ``units`` (default all) of ``layer``: each of their top-k images projected from the unit's
    strongest activation in it (paper section 2.1), and the image patch under that activation."""
    if layer not in topk.values:
        raise ConvscopeError(f"the scan has no layer {layer!r}; scanned layers: {', '.join(topk.layers)}")
    units = torch.as_tensor(select_units(topk.values[layer].shape[0], None) if units is None else units).long()
    images_idx, positions = topk.images[layer][units], topk.positions[layer][units]
    if (images_idx < 0).any():
        raise ConvscopeError("the scan saw fewer images than k: scan more images")
    x0 = data.batch(images_idx[:1, 0])[0]
    with torch.no_grad(), eval_mode(model):
        act = run_to(model, site(model, layer), x0)
        if act.dim() != 4:
            raise ConvscopeError(f"layer {layer!r} has no spatial map, so its units have no image patches: "
                                 "Fig. 2 needs a convolutional layer (use Projector.project for fc units)")
    size = tuple(x0.shape[-2:])
    flat_pos = [tuple(p) for p in positions.reshape(-1, 2).tolist()]
    distinct = sorted(set(flat_pos))
    box_of = dict(zip(distinct, receptive_field(model, layer, distinct, input_size=size)))
    boxes = torch.tensor([list(box_of[p]) for p in flat_pos]).view(*positions.shape[:2], 4)
    canvas = field_size(model, layer, size)

    projector = Projector(model, rule)
    flat_idx, flat_units = images_idx.reshape(-1), units.repeat_interleave(images_idx.shape[1])
    projections, patches = [], []
    for start in range(0, len(flat_idx), batch_size):
        idx = flat_idx[start:start + batch_size]
        imgs = data.batch(idx)[0]
        proj = projector.project(imgs, layer, channel=flat_units[start:start + batch_size]).detach().cpu()
        for j in range(len(idx)):
            b = flat_pos[start + j]
            y0, x0_, y1, x1 = box_of[b]
            projections.append(_place(proj[j, :, y0:y1, x0_:x1], box_of[b], size, canvas, 0.0))
            patches.append(_place(imgs[j, :, y0:y1, x0_:x1], box_of[b], size, canvas, 0.5))
    shape = (*images_idx.shape, 3, *canvas)
    return UnitViews(layer, units, topk.values[layer][units], images_idx, boxes,
                     torch.stack(projections).view(shape), torch.stack(patches).view(shape))


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


def save_views(out_dir: str | Path, views: UnitViews, ncol: int = 4) -> list[Path]:
    """Write ``fig2_<layer>.png`` (the layer grid) and ``units/<layer>/unit_NNNN.png`` (one per unit)."""
    out_dir = Path(out_dir)
    paths = [artifacts.save_image(out_dir / f"fig2_{views.layer}.png", layer_grid(views, ncol))]
    for u, unit in enumerate(views.units.tolist()):
        paths.append(artifacts.save_image(out_dir / "units" / views.layer / f"unit_{unit:04d}.png",
                                          unit_tile(views, u)))
    return paths


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
