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
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import artifacts, distributed, scanned
from .analyses import LAYERS_HELP, RULE_HELP, SPLIT_HELP, Analysis, register
from .data import seeded_subset
from .deconvnet import RULES, Projector
from .distributed import Group, barrier
from .errors import ConvscopeError, check_int, check_seed, unknown
from .findings import Finding, difference_contrast, finding, mean_contrast
from .forward import eval_mode, exact_float32, input_channels, run_to
from .imaging import caption, make_grid, to_image, upscale
from .layers import site
from .layout import Layout
from .receptive_field import receptive_field
from .topk import TopK, load_topk, save_topk, scan

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
    boxes: dict = field(default_factory=dict)
    crops: bool = True

    @property
    def canvas(self) -> tuple[int, int]:
        return min(self.extent[0], self.size[0]), min(self.extent[1], self.size[1])


def unit_views(model: nn.Module, data, topk: TopK, layer: str, units=None, rule: str = "deconvnet",
               batch_size: int = 64, nonlinearities: str = "error", cache: dict | None = None) -> UnitViews:
    """Fig. 2 for ``units`` (default all) of ``layer``: each of their top-k images projected from the unit's
    strongest activation in it (paper section 2.1), and the image patch under that activation. ``cache``: a dict
    the caller keeps between calls on the same model, so each layer's geometry is measured once."""
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
            topk.values[layer][units].reshape(-1), rule, nonlinearities, batch_size, cache)
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


def _crops(model: nn.Module, layer: str, fetch, channels: torch.Tensor, positions: torch.Tensor,
           values: torch.Tensor, rule: str, nonlinearities: str, batch_size: int = 64, cache: dict | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For M (image, channel, position) triples whose activations are ``values``, ``fetch(index)`` giving the
    images of the triples ``index``: the receptive fields (M, 4), the projections and patches cropped to them on
    the layer's canvas (M, 3, h, w), and how many projections came from crops.

    Each projection is computed from a crop of its image that holds the unit's receptive field (:func:`_window`):
    nothing outside the field reaches the unit, so on a convolutional stack the crop gives the same projection at
    a fraction of the cost, batched across units and images. Where the crop does not reproduce the unit's
    activation (a model that is not translation-equivariant below the layer), that projection is computed from
    the whole image instead: the crop is an optimisation, never an approximation."""
    x0 = fetch(torch.tensor([0]))
    size = tuple(x0.shape[-2:])
    cache = {} if cache is None else cache
    geo = cache.get((layer, size))
    if geo is None:
        with torch.no_grad(), eval_mode(model):
            act = run_to(model, site(model, layer), x0)
        if act.dim() != 4:
            raise ConvscopeError(f"layer {layer!r} has no spatial map, so its units have no image patches: "
                                 "Fig. 2 needs a convolutional layer (use Projector.project for fc units)")
        geo = cache[(layer, size)] = _Geometry(size, *grid(model, layer, size))
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
    for index in [*groups, torch.nonzero(full).flatten()]:
        for start in range(0, len(index), batch_size):
            idx = index[start:start + batch_size]
            imgs = fetch(idx)
            proj, redo = None, torch.ones(len(idx), dtype=torch.bool)
            win = windows[idx]
            if crop_ok and not full[idx[0]]:
                top_left, (h, w) = win[:, :2], win[0, 2:].tolist()
                crops = torch.stack([imgs[j, :, y:y + h, x:x + w] for j, (y, x) in enumerate(top_left.tolist())])
                where = positions[idx] - top_left // torch.tensor(step).clamp_min(1)
                try:
                    with _cropped(model, top_left):
                        proj, got = projector.project_at(crops, layer, channels[idx], where)
                    redo = ~torch.isclose(got.float().cpu(), values[idx].float(), rtol=_tolerance(got), atol=1e-6)
                except (RuntimeError, ConvscopeError):  # the model takes no crop of this size: whole images
                    crop_ok = False
                if redo.all():
                    crop_ok = False  # not one crop reproduced its unit: stop trying on this layer
            if redo.any():
                whole, _ = projector.project_at(imgs[redo], layer, channels[idx][redo], positions[idx][redo])
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
                patches[i] = _place(imgs[j, :, y0:y1, x0_:x1].cpu(), b, size, canvas, 0.5)
    return boxes, projections, patches, cropped


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


def layer_grid(views: UnitViews | list[np.ndarray], ncol: int = 4, min_side: int = 40) -> np.ndarray:
    """All units of a UnitViews (or their tiles) as one picture, like one layer's panel of Fig. 2."""
    tiles = views if isinstance(views, list) else [unit_tile(views, u, min_side) for u in range(len(views.units))]
    return make_grid(tiles, nrow=ncol, pad=6, fill=255)


def unit_agreement(topk: TopK, labels: torch.Tensor, layer: str) -> torch.Tensor:
    """Per unit of ``layer``, (C,): the share of pairs of its top-k images that share a class (see
    :func:`class_agreement`, their mean)."""
    idx = topk.images[layer]
    lab = labels[idx.clamp_min(0)]
    k = idx.shape[1]
    same = (lab[:, :, None] == lab[:, None, :]).float().sum((1, 2)) - k
    return same / (k * (k - 1))


def class_agreement(topk: TopK, labels: torch.Tensor, layer: str) -> tuple[float, float]:
    """How often two of a unit's top-k images share a class, averaged over units, and what chance gives (the
    same for labels drawn at random with the data set's class frequencies). Fig. 2's claim that upper-layer
    units are class-specific, as a number."""
    freq = torch.bincount(labels).double() / len(labels)
    return unit_agreement(topk, labels, layer).mean().item(), float((freq * freq).sum())


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
    boxes, proj, patches, _ = _crops(model, layer, lambda i: images[image_of[i]], chans.reshape(-1),
                                     positions.reshape(-1, 2), values.reshape(-1), rule, nonlinearities)
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


def thumbnail(views: UnitViews, u: int, side: int = 48) -> np.ndarray:
    """A unit's thumbnail for its layer's page: the projection of its strongest activation, ``side`` px."""
    from PIL import Image

    image = Image.fromarray(to_image(views.projections[u, :1])[0])
    return np.asarray(image.resize((side, side), Image.Resampling.NEAREST if image.width < side
                                   else Image.Resampling.LANCZOS))


PANEL = 16  # units in a layer's Fig. 2 panel: a seeded sample, as the paper's panels show a few per layer
CHUNK = 32  # units drawn at once: the projections of a chunk are all in memory together


@dataclass
class ScanResult:
    """Fig. 2 over a run: the scan of one split (``topk``) and the units to draw per layer (``units``), under each
    of ``rules`` (the first the main one). Every unit of a large model does not fit in memory at once, so the
    projections are made as :func:`write_scan` asks for them, a chunk of units at a time (``draw(layer, units,
    rule) -> UnitViews``), and a killed write resumes at the first chunk it had not written. ``identity`` says
    which scan this is (split, data, model, k, rules): the drawing's resume state must match it."""

    topk: TopK
    split: str
    units: dict[str, torch.Tensor]
    rules: list[str]
    nonlinearities: str
    identity: dict
    draw: Callable[[str, torch.Tensor, str], UnitViews]
    seed: int = 0
    classes: list[str] = field(default_factory=list)  # the data's class names (the per-class statistics' order)
    group: Group = field(default_factory=Group)  # the processes that share the drawing (torchrun)
    labels: torch.Tensor | None = None  # the scanned split's labels (None where it has none): Fig. 2's findings

    @property
    def rule(self) -> str:
        return self.rules[0]


def parse_rules(rule: str) -> list[str]:
    """``deconvnet`` or ``deconvnet,guided,gradient``: the rules, each once, the first the main one."""
    rules = list(dict.fromkeys(r.strip() for r in str(rule).split(",") if r.strip()))
    if not rules:
        raise ConvscopeError(f"no projection rule named in {rule!r}; valid: {', '.join(RULES)}")
    for r in rules:
        if r not in RULES:
            raise unknown("rule", r, RULES)
    return rules


CLASS_BYTES = 2 << 30  # the most memory the per-class statistics may take


def compute(run: Run, layers: list[str] | None = None, k: int = 9, split: str | None = None, units: int = 0,
            seed: int = 0, rule: str = "deconvnet", class_k: int = 25, batch_size: int = 128,
            progress: bool | None = None) -> ScanResult:
    """Fig. 2: scan ``split`` for the top-``k`` of every map of ``layers`` (resuming an interrupted scan from
    the run's scan state), and each map's top ``class_k`` images per class (what a unit is about); the units to
    draw are every unit of each layer (``units`` 0), or a seeded subset of ``units`` per layer, under each of
    the comma-separated ``rule``."""
    rules = parse_rules(rule)
    check_int(units, "units (0 for all)", 0)
    check_int(class_k, "class-k", 0, 10000)
    check_int(batch_size, "batch-size", 1, 1 << 20)
    check_seed(seed)
    layers = run.check_layers(list(layers)) if layers is not None else run.map_layers()
    split = split or run.default_split("val")
    data = run.split(split)
    need = sum(run.channels(layer) for layer in layers) * len(data.classes) * class_k * 12
    if need > CLASS_BYTES:
        raise ConvscopeError(f"--class-k {class_k} keeps {need / 2**30:.1f} GiB of per-class statistics for "
                             f"{len(data.classes)} classes, more than {CLASS_BYTES / 2**30:.0f} GiB: ask for fewer "
                             "(--class-k 5), or 0 for none")
    # A model the rules cannot project fails here, before the scan rather than after it.
    for r in rules:
        Projector(run.model, r, run.nonlinearities).project(data.batch(torch.tensor([0]))[0], layers[-1])
    identity = {"split": split, "data": data.name, "model": run.fingerprint}
    group = distributed.init()
    topk = scan(run.model, data, layers, k=k, batch_size=batch_size, progress=progress, identity=identity,
                class_k=class_k, group=group,
                state_path=run.layout.of_rank(run.layout.scan_state, group.rank, group.world), workers=run.workers)
    chosen = {layer: select_units(topk.values[layer].shape[0], units or None, seed) for layer in layers}

    cache: dict = {}  # each layer's geometry, measured once for all its chunks and rules

    def draw(layer: str, which: torch.Tensor, rule: str) -> UnitViews:
        return unit_views(run.model, data, topk, layer, which, rule=rule, nonlinearities=run.nonlinearities,
                          cache=cache)

    return ScanResult(topk, split, chosen, rules, run.nonlinearities,
                      {**identity, "layers": layers, "k": k, "rules": rules, "nonlinearities": run.nonlinearities},
                      draw, seed, list(data.classes), group, _labels(data))


def _labels(data) -> torch.Tensor | None:
    # A lookup, not a pass over the images: the scan's cost stays what it was.
    labels = getattr(data, "labels", None)
    return labels.detach().cpu().long().clone() if isinstance(labels, torch.Tensor) and len(labels) else None


def _drawn(path: Path, identity: dict) -> dict[str, set[int]]:
    """The units a killed write of this same scan had drawn (layer -> units); nothing for another scan's record."""
    import json

    try:
        state = json.loads(path.read_text())
        if state.get("identity") == identity:
            return {layer: {int(u) for u in units} for layer, units in state["units"].items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return {}


def _tile_paths(result: ScanResult, layout: Layout, layer: str, unit: int) -> list[Path]:
    return [*(layout.unit(layer, unit, None if r == result.rule else r) for r in result.rules),
            layout.unit_thumb(layer, unit)]


def _draw(result: ScanResult, layout: Layout, mine: dict[str, torch.Tensor], keep: dict[str, list[int]],
          progress: bool | None) -> dict[str, dict[int, np.ndarray]]:
    """Draw ``mine`` (layer -> units) a chunk at a time, each unit's tiles and thumbnail written and recorded in
    this process's drawing record, skipping what a killed write of the same scan recorded; the tiles of the
    units in ``keep`` (layer -> units) are returned for the layer panels."""
    from tqdm.auto import tqdm

    record = layout.of_rank(layout.drawn, result.group.rank, result.group.world)
    done = _drawn(record, result.identity)
    note = {r: gradient_note(r, result.nonlinearities) for r in result.rules}
    kept: dict[str, dict[int, np.ndarray]] = {layer: {} for layer in mine}
    bar = tqdm(total=sum(len(u) for u in mine.values()), desc="draw", unit="unit",
               disable=(None if progress is None else not progress) or not result.group.main)
    for layer, units in mine.items():
        todo = torch.tensor([u for u in units.tolist() if u not in done.get(layer, set())
                             or not all(p.is_file() for p in _tile_paths(result, layout, layer, u))], dtype=torch.long)
        bar.update(len(units) - len(todo))
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            for rule in result.rules:
                views = result.draw(layer, chunk, rule)
                for u, unit in enumerate(chunk.tolist()):
                    tile = unit_tile(views, u)
                    artifacts.save_image(layout.unit(layer, unit, None if rule == result.rule else rule),
                                         caption(tile, note[rule]))
                    if rule == result.rule:
                        artifacts.save_image(layout.unit_thumb(layer, unit), thumbnail(views, u))
                        if unit in keep.get(layer, ()):
                            kept[layer][unit] = tile
            done.setdefault(layer, set()).update(chunk.tolist())
            artifacts.write_json(record, {"identity": result.identity,
                                          "units": {n: sorted(us) for n, us in done.items()}})
            bar.update(len(chunk))
    bar.close()
    return kept


def write_scan(result: ScanResult, layout: Layout, ncol: int = 4, progress: bool | None = None) -> list[Path]:
    """The scan (``scan/topk.safetensors``), every chosen unit's tile under each rule and its thumbnail, and each
    layer's panel (``fig2_<layer>.png``, a sample of :data:`PANEL` units). Units are drawn a chunk at a time, and
    ``scan/drawn.json`` records them: a killed write skips what it had drawn when started again. The scan's
    resume state is removed when all is written.

    Under torchrun every rank draws its share of the units (every world-th), with its own record; rank 0 writes
    the scan, with how many processes made it (``world_size``) and each one's shard, and the panels, and returns
    the paths (the other ranks an empty list)."""
    group = result.group
    panels = {layer: chosen[select_units(len(chosen), PANEL, result.seed)].tolist()
              for layer, chosen in result.units.items()}
    paths = []
    if group.main:
        meta = {"split": result.split, "rule": result.rule, "rules": result.rules, "world_size": group.world,
                "nonlinearities": result.nonlinearities, "classes": result.classes, "shards": result.topk.shards}
        paths.append(save_topk(layout.topk, result.topk, meta))
    mine = {layer: chosen[group.rank::group.world] for layer, chosen in result.units.items()}
    kept = _draw(result, layout, mine, panels if group.main else {}, progress)
    barrier(group)  # every unit drawn before rank 0 lists them
    if group.main:
        note = gradient_note(result.rule, result.nonlinearities)
        for layer, chosen in result.units.items():
            missing = torch.tensor([u for u in panels[layer] if u not in kept[layer]], dtype=torch.long)
            if len(missing):  # drawn by another rank, or by the killed write this one resumed
                views = result.draw(layer, missing, result.rule)
                kept[layer].update({unit: unit_tile(views, u) for u, unit in enumerate(missing.tolist())})
            picture = layer_grid([kept[layer][u] for u in panels[layer]], ncol)
            paths.append(artifacts.save_image(layout.layer_figure("fig2", layer), caption(picture, note)))
            for unit in chosen.tolist():
                paths.extend(_tile_paths(result, layout, layer, unit))
    artifacts.remove(layout.of_rank(layout.scan_state, group.rank, group.world))
    return paths


def summary(result: ScanResult) -> str:
    return (f"scanned {result.topk.seen} images of split {result.split!r}; drew "
            + ", ".join(f"{len(u)} units of {layer}" for layer, u in result.units.items())
            + (f" under {', '.join(result.rules)}" if len(result.rules) > 1 else ""))


def findings(result: ScanResult) -> list[Finding]:
    """Paper Fig. 2 (section 4): higher layers show "more class-specific" structure. Two claims on the scan: a unit's
    top-k images share a class more often than chance at the last layer scanned (per-unit :func:`unit_agreement`
    against the chance that two distinct images of the split share a class), and more often there than at the
    first layer scanned (units of the two layers as independent samples). None where the split has no labels (or
    one class) or the scan saw fewer than k images. Projection energy on the object (:func:`mask_energy`) is not
    here: the scan holds neither projections nor masks, and drawing them is what :func:`write_scan` spends its
    time on."""
    topk, labels, layers = result.topk, result.labels, result.topk.layers
    if (labels is None or not layers or topk.k < 2 or topk.seen < topk.k or labels.min() < 0
            or len(torch.unique(labels)) < 2):
        return []
    agree = {layer: unit_agreement(topk, labels, layer) for layer in layers}
    # Chance for two distinct images, drawn without replacement: class_agreement's sum of squared frequencies
    # is the same at a thousand images but above it on a small split, where it would read as units below chance.
    counts = torch.bincount(labels).double()
    chance = float((counts * (counts - 1)).sum() / (len(labels) * (len(labels) - 1)))
    first, top, k = layers[0], layers[-1], topk.k
    every = ", ".join(f"{layer} {float(a.mean()):.2f}" for layer, a in agree.items())
    out = [finding(f"fig2.{top}.class_agreement", f"Upper-layer units are class-specific: two of a unit's top-{k} "
                   f"images share a class more often than chance ({top})", "Zeiler & Fergus 2014, Fig. 2", "fig2",
                   mean_contrast(agree[top], chance, unit=f"{top} units"),
                   f"share of a unit's top-{k} image pairs of one class at {top}, minus chance ({chance:.3f})",
                   "qualitative (Fig. 2)", f"{every}; chance {chance:.2f}")]
    if top != first:
        out.append(finding(f"fig2.{first}_{top}.agreement_rises", f"Class specificity rises with depth: a unit's "
                           f"top-{k} images share a class more often at {top} than at {first}",
                           "Zeiler & Fergus 2014, Fig. 2", "fig2",
                           difference_contrast(agree[top], agree[first], unit="units"),
                           f"mean top-{k} class agreement at {top} minus at {first}", "qualitative (Fig. 2)", every))
    return out


def _check_scan(layout: Layout) -> list[tuple[Path, str]]:
    """The scan's record (its top-k tensors) where it is there but does not load."""
    if not layout.topk.exists():
        return []
    try:
        load_topk(layout.topk)
    except ConvscopeError:
        return [(layout.topk, "not readable")]
    return []


register(Analysis(
    "scan", "fig2", "Fig. 2", "Feature visualisation",
    "Per layer, a subset of feature maps; per map its top-9 activations over the validation set, each "
    "projected to pixels by the deconvnet (left 3x3), beside the image patches under them (right 3x3).",
    files=lambda layout: (list(layout.layer_figures("fig2").values()), []),
    compute=compute, write=write_scan, per_layer=True, projects=True, distributed=True,
    findings=findings,
    help={"layers": LAYERS_HELP + " [conv1..conv5, or the model's stages]",
          "k": "Strongest activations kept per feature map.", "split": SPLIT_HELP.replace("val / test", "val"),
          "units": "Units per layer to draw (a seeded subset); 0 = all.", "seed": "Seed of the unit subset.",
          "batch_size": "Images per forward pass of the scan (lower it where memory is short; the result is "
                        "the same).",
          "class_k": "Strongest images kept per map and class (zennit-crp's per-class statistics); a unit's "
                     "class histogram counts the classes of its class-k strongest images. 0 = none.",
          "rule": RULE_HELP + " Several, comma-separated (deconvnet,guided,gradient), draw each unit under "
                          "each; the viewer switches between them."},
    summary=summary, check=_check_scan, units=lambda layout: Layout.unit_files(layout.units),
    unit_panel=scanned.unit_panel, unit_thumb=scanned.unit_thumb, unit_badges=scanned.unit_badges))
