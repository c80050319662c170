"""Many maps of a few images on one sheet (``convscope project``): for each image and map, the map's strongest
activation projected to pixels above the image patch under it (paper section 2.1), with the numbers beside."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import artifacts
from .deconvnet import gradient_note
from .errors import ConvscopeError
from .forward import eval_mode, run_to
from .imaging import caption, make_grid, to_image, upscale
from .layers import site
from .views import _crops


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
    boxes, proj, patches, _ = _crops(model, layer, lambda i: images[image_of[i]], chans.reshape(-1),
                                     positions.reshape(-1, 2), values.reshape(-1), rule, nonlinearities,
                                     images=image_of)
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


__all__ = ["ProjectionSheet", "project_images", "sheet_picture", "write_sheet"]
