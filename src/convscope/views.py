"""Paper Fig. 2's pictures of units: each unit's top-k activations from a :class:`~convscope.topk.TopK` scan
projected to pixels beside the image patches under them (the unit's receptive field in each image), and the
tiles, grids and thumbnails drawn from them.

:func:`unit_views` computes the projections and patches for some units of one layer (one forward and one backward
pass per chunk of images, every image with its own target map); :func:`unit_tile`, :func:`layer_grid` and
:func:`thumbnail` turn them into pictures. Projections and patches are cropped to each unit's receptive field and
placed on a canvas the size of the largest field of the layer, so the 3x3 blocks line up; where a field is clipped
by the image border, the crop sits against the side it was clipped on. The pictures show each crop at most
:data:`DISPLAY` px a side (:func:`shown`), the size a page shows; the views keep the full resolution.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import memory
from .data import seeded_subset
from .deconvnet import Projector
from .errors import ConvscopeError
from .forward import eval_mode, exact_float32, input_channels, run_to
from .imaging import make_grid, to_image, upscale
from .layers import census, site
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
    cropped: int = 0  # projections computed from crops of their images (the rest from whole images)


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


def grid(model: nn.Module, layer: str, image_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """A unit's receptive field (height, width) where the border does not clip it, and the step in pixels between
    neighbouring units (rows, columns; 0 along a side with one unit): measured at the centre of an image four
    times larger (at the image's own size where the model takes no other)."""
    param = next(model.parameters())
    for side in (4, 1):
        big = (side * image_hw[0], side * image_hw[1])
        x = torch.zeros(1, input_channels(model) or 3, *big, dtype=param.dtype, device=param.device)
        try:
            with torch.no_grad(), eval_mode(model):
                h, w = run_to(model, site(model, layer), x).shape[-2:]
            break
        except (RuntimeError, ValueError, ConvscopeError):
            if side == 1:
                raise
    r, c = h // 2, w // 2
    box, down, right = receptive_field(model, layer, [(r, c), (min(r + 1, h - 1), c), (r, min(c + 1, w - 1))],
                                       input_size=big)
    return (box.y1 - box.y0, box.x1 - box.x0), (down.y0 - box.y0, right.x0 - box.x0)


@dataclass
class _Geometry:
    """What one layer's crops need, measured once per layer and image size: the unclipped field and the step
    between units (:func:`grid`), the receptive field of each position met so far, and whether crops work."""

    size: tuple[int, int]
    extent: tuple[int, int]
    step: tuple[int, int]
    per_image: int  # bytes a whole image costs a projection (:func:`graph_bytes`)
    boxes: dict = field(default_factory=dict)
    crops: bool = True

    @property
    def canvas(self) -> tuple[int, int]:
        return min(self.extent[0], self.size[0]), min(self.extent[1], self.size[1])


def unit_views(model: nn.Module, data, topk: TopK, layer: str, units=None, rule: str = "deconvnet",
               max_memory: str | int | None = None, nonlinearities: str = "error", cache: dict | None = None
               ) -> UnitViews:
    """Fig. 2 for ``units`` (default all) of ``layer``: each of their top-k images projected from the unit's
    strongest activation in it (paper section 2.1), and the image patch under that activation. The images go
    through the model in batches that fit half of ``max_memory`` (:func:`convscope.memory.budget`; the pictures
    are the same under any). ``cache``: a dict the caller keeps between calls on the same model, so each layer's
    geometry and cost are measured once."""
    if layer not in topk.values:
        raise ConvscopeError(f"the scan has no layer {layer!r}; scanned layers: {', '.join(topk.layers)}")
    units = torch.as_tensor(select_units(topk.values[layer].shape[0], None) if units is None else units).long()
    images_idx, positions = topk.images[layer][units], topk.positions[layer][units]
    if (images_idx < 0).any():
        raise ConvscopeError("the scan saw fewer images than k: scan more images")
    flat_idx = images_idx.reshape(-1)
    k = images_idx.shape[1]
    with exact_float32():  # the crops reproduce the scan's float32 values on CUDA too
        boxes, projections, patches, cropped = _crops(
            model, layer, lambda i: data.batch(flat_idx[i])[0], units.repeat_interleave(k), positions.reshape(-1, 2),
            topk.values[layer][units].reshape(-1), rule, nonlinearities, max_memory, cache, flat_idx)
    return UnitViews(layer, units, topk.values[layer][units], images_idx, boxes.view(-1, k, 4),
                     projections.view(-1, k, *projections.shape[1:]), patches.view(-1, k, *patches.shape[1:]),
                     cropped)


def _window(box, size: tuple[int, int], field: tuple[int, int], step: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop (top, left, height, width) of an image that holds a unit's whole receptive field ``box`` and keeps
    the layer's grid: its corner a multiple of the step between units, so every layer below computes on the same
    grid and the unit sits at its position minus corner / step. Same-sized for units away from the far borders,
    so they batch together."""
    out = []
    for b0, b1, n, f, s in ((box[0], box[2], size[0], field[0], step[0]), (box[1], box[3], size[1], field[1], step[1])):
        if s <= 0 or f + s - 1 >= n:
            out.append((0, n))
            continue
        o = b0 // s * s
        e = min(o + f + s - 1, n)
        out.append((o, e - o) if e >= b1 else (0, n))
    (top, h), (left, w) = out
    return top, left, h, w


@contextmanager
def _cropped(model: nn.Module, origins: torch.Tensor):
    """Tell every module that needs to know (a per-pixel mean, say: ``cropped(origins)``) where the crops sit."""
    with ExitStack() as stack:
        for m in model.modules():
            if callable(getattr(m, "cropped", None)):
                stack.enter_context(m.cropped(origins))
        yield


def _geometry(model: nn.Module, layer: str, x0: torch.Tensor, cache: dict | None) -> _Geometry:
    """The layer's :class:`_Geometry` at the size of image ``x0`` (1, C, H, W), from ``cache`` or measured there."""
    size = tuple(x0.shape[-2:])
    cache = {} if cache is None else cache
    geo = cache.get((layer, size))
    if geo is None:
        with torch.no_grad(), eval_mode(model):
            act = run_to(model, site(model, layer), x0)
        if act.dim() != 4:
            raise ConvscopeError(f"layer {layer!r} has no spatial map, so its units have no image patches: "
                                 "Fig. 2 needs a convolutional layer (use Projector.project for fc units)")
        geo = cache[(layer, size)] = _Geometry(size, *grid(model, layer, size), graph_bytes(model, layer, size))
    return geo


def chunk_units(model: nn.Module, data, layer: str, k: int, max_memory: str | int | None = None,
                cache: dict | None = None) -> int:
    """How many units' views (:class:`UnitViews`: k projections and k patches each, on the layer's canvas, in
    float32) fit a quarter of ``max_memory`` (:func:`convscope.memory.budget`): at least one."""
    x0 = data.batch(torch.tensor([0]))[0]
    canvas = _geometry(model, layer, x0, cache).canvas
    per_unit = k * 2 * x0.shape[1] * canvas[0] * canvas[1] * 4
    return max(1, memory.budget(max_memory, memory.device_of(model)) // 4 // per_unit)


def graph_bytes(model: nn.Module, layer: str, size: tuple[int, int]) -> int:
    """What one image of ``size`` costs a projection from ``layer``: the outputs of the modules without
    submodules that run up to it (the census's shapes; a module called several times counted each time), which
    the forward pass keeps for the backward (the backward's gradients are freed as it goes; an in-place module's
    output, counted, is not a new tensor: an estimate from above)."""
    param = next(model.parameters(), None)
    element = param.element_size() if param is not None else 4
    leaves = {name for name, m in model.named_modules() if name and next(m.children(), None) is None}
    infos = census(model, size)
    target = site(model, layer).name
    last = max((i.order for i in infos if i.name == target or i.name.startswith(target + ".")), default=-1)
    numbers = sum(math.prod(i.shape) * i.calls for i in infos if i.name in leaves and i.shape and 0 <= i.order <= last)
    return max(1, element * numbers)


def batch_for(budget: int, per_image: int, area: float = 1.0, most: int = 256) -> int:
    """The images of ``per_image`` bytes (at ``area`` of that size) a batch holds in ``budget``: 1 to ``most``."""
    return int(max(1, min(most, budget // max(1, int(per_image * area)))))


def _crops(model: nn.Module, layer: str, fetch, channels: torch.Tensor, positions: torch.Tensor,
           values: torch.Tensor, rule: str, nonlinearities: str, max_memory: str | int | None = None,
           cache: dict | None = None, images: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For M (image, channel, position) triples whose activations are ``values``, ``fetch(index)`` giving the
    images of the triples ``index``: the receptive fields (M, 4), the projections and patches cropped to them on
    the layer's canvas (M, 3, h, w), and how many projections came from crops.

    Each projection is computed from a crop of its image that holds the unit's receptive field (:func:`_window`):
    nothing outside the field reaches the unit, so on a convolutional stack the crop gives the same projection at
    a fraction of the cost, batched across units and images. Where the crop does not reproduce the unit's
    activation (a model that is not translation-equivariant below the layer), that projection is computed from
    the whole image instead: the crop is an optimisation, never an approximation. ``images``: the image of each
    triple (default: all different); triples of one image with the same crop share its forward pass."""
    x0 = fetch(torch.tensor([0]))
    size = tuple(x0.shape[-2:])
    geo = _geometry(model, layer, x0, cache)
    flat_pos = [tuple(p) for p in positions.tolist()]
    new = sorted(set(flat_pos) - set(geo.boxes))
    if new:
        geo.boxes.update(zip(new, receptive_field(model, layer, new, input_size=size)))
    box_of, canvas = geo.boxes, geo.canvas
    boxes = torch.tensor([list(box_of[p]) for p in flat_pos], dtype=torch.long).view(-1, 4)
    windows = torch.tensor([_window(b, size, geo.extent, geo.step) for b in boxes.tolist()],
                           dtype=torch.long).view(-1, 4)
    step = geo.step
    projector = Projector(model, rule, nonlinearities)
    m, c = len(flat_pos), x0.shape[1]
    projections, patches = torch.zeros(m, c, *canvas), torch.zeros(m, c, *canvas)
    full = windows[:, 2:].eq(torch.tensor(size)).all(1)  # crops that are the whole image: nothing to gain
    crop_ok, cropped = geo.crops, 0
    shapes = sorted({tuple(w) for w in windows[~full, 2:].tolist()}, reverse=True)
    groups = [torch.nonzero(~full & windows[:, 2:].eq(torch.tensor(s)).all(1)).flatten() for s in shapes]
    # half of the budget for a batch's pass; the other half for what the caller holds, and the model
    budget = memory.budget(max_memory, memory.device_of(model)) // 2
    ids = torch.arange(m) if images is None else torch.as_tensor(images).long().cpu()
    for index in [*groups, torch.nonzero(full).flatten()]:
        if not len(index):
            continue
        crop = windows[index[0], 2:]
        batch_size = batch_for(budget, geo.per_image, float(crop[0] * crop[1]) / (size[0] * size[1]))
        for idx, owner in _shared(index, ids, windows, batch_size):
            heads = torch.zeros(int(owner.max()) + 1, dtype=torch.long)
            heads[owner] = idx  # a triple of each crop (any one: they share its image and its window)
            imgs = fetch(heads)
            proj, redo = None, torch.ones(len(idx), dtype=torch.bool)
            win = windows[idx]
            if crop_ok and not full[idx[0]]:
                top_left, (h, w) = windows[heads, :2], win[0, 2:].tolist()
                crops = torch.stack([imgs[j, :, y:y + h, x:x + w] for j, (y, x) in enumerate(top_left.tolist())])
                where = positions[idx] - win[:, :2] // torch.tensor(step).clamp_min(1)
                try:
                    with _cropped(model, top_left):
                        proj, got = projector.project_at(crops, layer, channels[idx], where, owner)
                    redo = ~torch.isclose(got.float().cpu(), values[idx].float(), rtol=_tolerance(got), atol=1e-6)
                except (RuntimeError, ConvscopeError):  # the model takes no crop of this size: whole images
                    crop_ok = False
                if redo.all():
                    crop_ok = False  # not one crop reproduced its unit: stop trying on this layer
            if redo.any():
                again, mine = torch.unique(owner[redo], return_inverse=True)
                whole, _ = projector.project_at(imgs[again], layer, channels[idx][redo], positions[idx][redo], mine)
                if proj is None:
                    proj, win = whole, torch.tensor([[0, 0, *size]]).expand(len(idx), 4)
                else:
                    proj = _paste(proj, whole, redo, size)
                    win = win.clone()
                    win[redo] = torch.tensor([0, 0, *size])
            cropped += int((~redo).sum()) if proj is not None and not full[idx[0]] else 0
            geo.crops = crop_ok
            proj = proj.detach().cpu()
            for j, i in enumerate(idx.tolist()):
                y0, x0_, y1, x1 = b = box_of[flat_pos[i]]
                oy, ox = win[j, :2].tolist()
                projections[i] = _place(proj[j][:, y0 - oy:y1 - oy, x0_ - ox:x1 - ox], b, size, canvas, 0.0)
                patches[i] = _place(imgs[owner[j], :, y0:y1, x0_:x1].cpu(), b, size, canvas, 0.5)
    return boxes, projections, patches, cropped


def _shared(index: torch.Tensor, ids: torch.Tensor, windows: torch.Tensor, batch_size: int):
    """The triples ``index`` (of one crop size) in batches of at most ``batch_size`` distinct crops (an image and
    where its window sits) and four times as many triples, as ``(triples, owner)``: ``owner[j]``, the batch's
    crop of triple j, numbered 0, 1, ... in the batch. Triples of one crop are in one batch, so they share its
    forward pass; and the crops of a batch hold about as many triples each (the fewest at least four fifths of the
    most), since every backward pass runs over the whole batch: m backward passes of a batch of crops shared m
    times each cost what m batches of those crops cost unshared, with m times fewer forward passes. (Measured
    on 2 CPU cores, all units of zfnet's conv5 at 224 px: 8-10% faster than unshared; of zfnet_small's conv3 at
    64 px, 12%; batched by exact counts instead, 20% slower there: many small batches.)"""
    keys = torch.stack([ids[index], windows[index, 0], windows[index, 1]], 1)
    _, crop, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    place = torch.empty_like(counts)
    place[torch.argsort(counts, descending=True, stable=True)] = torch.arange(len(counts))
    order = torch.argsort(place[crop], stable=True)
    index, crop = index[order], place[crop[order]]  # grouped by crop, most shared first
    shares = torch.bincount(crop, minlength=len(counts))
    ends, shares = torch.cumsum(shares, 0).tolist(), shares.tolist()
    start = first = 0
    for c, end in enumerate(ends):  # close a batch after crop c when the next one would not fit or differs
        last = c + 1 == len(ends)
        if (last or 5 * shares[c + 1] < 4 * shares[first] or c + 2 - first > batch_size
                or ends[c + 1] - start > 4 * batch_size):
            yield index[start:end], crop[start:end] - first
            start, first = end, c + 1


def _tolerance(values: torch.Tensor) -> float:
    """How far a crop's activation may differ from the scan's and still be the same number: float32 rounding, or
    TF32's on a GPU that convolves in it (PyTorch's default for cuDNN; about 1e-3 relative)."""
    return 5e-3 if values.is_cuda and torch.backends.cudnn.allow_tf32 else 1e-4


def _paste(proj: torch.Tensor, whole: torch.Tensor, rows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The batch's cropped projections with ``rows`` replaced by whole-image ones (so all are image-sized)."""
    out = torch.zeros(len(proj), proj.shape[1], *size, dtype=whole.dtype, device=whole.device)
    out[rows] = whole
    keep = ~rows
    out[keep, :, :proj.shape[2], :proj.shape[3]] = proj[keep]  # placed at (0, 0); the caller's window says so
    return out


DISPLAY = 128  # the most pixels a side of one projection or patch has on a page (a larger field is shrunk)


def shown(x: torch.Tensor, side: int = DISPLAY) -> torch.Tensor:
    """(N, C, h, w) as a page shows them: at most ``side`` px a side, averaged over the pixels each one covers
    (antialiased bilinear) where larger, in float64, before any rounding; as they are where smaller."""
    h, w = x.shape[-2:]
    scale = side / max(h, w)
    if scale >= 1:
        return x
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x.detach().cpu().double(), size=size, mode="bilinear", antialias=True, align_corners=False)


def projection_grid(views: UnitViews, u: int, min_side: int = 40, side: int = DISPLAY) -> np.ndarray:
    """Unit ``u``'s top-k projections as a 3x3 grid (each contrast-normalised on its own, grey = 0; enlarged
    to ``min_side``, shrunk to ``side``), uint8 (H, W, 3)."""
    proj = [upscale(im, min_side) for im in to_image(shown(views.projections[u], side))]
    return make_grid(proj, nrow=math.ceil(math.sqrt(len(proj))), pad=1)


def patch_grid(views: UnitViews, u: int, min_side: int = 40, side: int = DISPLAY) -> np.ndarray:
    """Unit ``u``'s top-k image patches as a 3x3 grid, the sizes of :func:`projection_grid`'s."""
    patches = (shown(views.patches[u], side).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return make_grid([upscale(im, min_side) for im in patches], nrow=math.ceil(math.sqrt(len(patches))), pad=1)


def unit_tile(views: UnitViews, u: int, min_side: int = 40, side: int = DISPLAY) -> np.ndarray:
    """One unit as the paper shows it: its top-9 projections (:func:`projection_grid`) beside the 3x3 image
    patches (:func:`patch_grid`). uint8 (H, W, 3)."""
    left, right = projection_grid(views, u, min_side, side), patch_grid(views, u, min_side, side)
    gap = np.full((left.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def layer_grid(views: UnitViews | list[np.ndarray], ncol: int = 4, min_side: int = 40) -> np.ndarray:
    """All units of a UnitViews (or their tiles) as one picture, like one layer's panel of Fig. 2."""
    tiles = views if isinstance(views, list) else [unit_tile(views, u, min_side) for u in range(len(views.units))]
    return make_grid(tiles, nrow=ncol, pad=6, fill=255)


def thumbnail(views: UnitViews, u: int, side: int = 48) -> np.ndarray:
    """A unit's thumbnail for its layer's page: the projection of its strongest activation, ``side`` px."""
    from PIL import Image

    image = Image.fromarray(to_image(views.projections[u, :1])[0])
    return np.asarray(image.resize((side, side), Image.Resampling.NEAREST if image.width < side
                                   else Image.Resampling.LANCZOS))
