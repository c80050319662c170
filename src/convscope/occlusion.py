"""Occlusion sensitivity (paper section 4.2, Fig. 7): a grey square slid over the image.

For every position of the occluder, ONE forward pass of the occluded image gives all of Fig. 7's panels:

- (b) the total activation of one map of the probed layer (conv5 by default): the map whose activation is
  strongest on the unoccluded image (its single largest value, as :class:`~convscope.deconvnet.Projector`
  picks maps);
- (c) that map's projection in the unoccluded image (deconvnet, its strongest activation seeded with its value);
- (d) the probability of the correct class;
- (e) the most probable class.

Positions follow Captum's ``Occlusion``: top-left corners ``0, stride, 2 stride, ...`` while the square fits, so
with ``stride == size`` and a side divisible by ``size``, Captum's per-pixel attribution equals
``p(unoccluded) - p(occluded by the square covering that pixel)``. The paper states neither size nor stride.
The default fill is the data's mean colour (the grey of a mean-subtracted input): the model's own input mean
when it has one (built-in models, trained), otherwise the mean colour of the image.

The occluded passes run incrementally where that is exact (:mod:`convscope.incremental`, Krypton: each layer
recomputed only where the square reaches it), else densely, one full forward pass per position; the result
says which and why. ``approx=True`` truncates the incremental change (Krypton's projective-field threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import artifacts
from .analyses import SPLIT_HELP, Analysis, figure_files, register
from .deconvnet import Projector, gradient_note
from .errors import ConvscopeError, check_int, printable
from .findings import Finding, finding, proportion_contrast
from .forward import check_images, eval_mode, run_to_all
from .imaging import to_image
from .incremental import map_totals
from .layers import site
from .layout import Layout
from .occluders import (
    as_fill,
    default_square,
    occluded_passes,
    square_positions,
)
from .panels import Line, Panel

if TYPE_CHECKING:
    from .run import Run


@dataclass
class OcclusionResult:
    """Paper Fig. 7 for one image. Maps are (rows, cols), one value per occluder position; ``positions`` holds
    each position's top-left ``(y, x)`` in pixels, shape (rows, cols, 2)."""

    image: torch.Tensor  # (C, H, W) the unoccluded image
    label: int  # the correct class
    layer: str
    channel: int  # the map strongest on the unoccluded image
    size: int
    stride: int
    fill: torch.Tensor  # (C,) the occluder's colour
    positions: torch.Tensor  # (rows, cols, 2) long, top-left (y, x)
    activation: torch.Tensor  # (b) total activation of ``channel``, (rows, cols)
    projection: torch.Tensor  # (c) (C, H, W), that map projected in the unoccluded image
    prob: torch.Tensor  # (d) p(label), (rows, cols)
    top_class: torch.Tensor  # (e) most probable class, (rows, cols) long
    prob_clean: float  # p(label) on the unoccluded image
    activation_clean: float  # total activation of ``channel`` on the unoccluded image
    method: str = "dense"  # how the occluded passes ran: "incremental", "approximate" or "dense"
    method_note: str = ""  # why that method (for dense: why not incremental)
    predicted: int = -1  # the most probable class on the unoccluded image (-1: not recorded)

    def centres(self) -> torch.Tensor:
        """Centre (x, y) in pixels of the square at every position, (rows, cols, 2)."""
        return self.positions.flip(-1).to(torch.float32) + self.size / 2

    def most_sensitive(self) -> tuple[int, int]:
        """Top-left (y, x) of the position that lowers p(correct class) most."""
        k = int(self.prob.flatten().argmin())
        return tuple(int(v) for v in self.positions.flatten(0, 1)[k])


def occlusion(
    model: nn.Module,
    image: torch.Tensor,
    label: int,
    layer: str = "conv5",
    size: int = 12,
    stride: int = 4,
    fill=None,
    batch_size: int = 64,
    rule: str = "deconvnet",
    nonlinearities: str = "error",
    method: str = "auto",
    approx: bool = False,
) -> OcclusionResult:
    """Occlusion sensitivity of one image (paper Fig. 7): all panels (b)-(e) from the same forward passes.

    ``image`` is (C, H, W) (or (1, C, H, W)) as the model takes it; ``label`` the correct class. ``size`` and
    ``stride`` are the square's side and step in pixels (defaults suit 64 px images; the paper does not say its
    own). ``fill`` is a number or one value per channel (default :func:`default_fill`). Occluded images run
    ``batch_size`` at a time; the result does not depend on it (to float rounding). The model's output is read
    as logits. ``method``: "auto" (incremental where exact, else dense), "incremental" (an error where it
    cannot be exact) or "dense"; ``approx`` truncates the incremental change (:func:`occluded_passes`).
    """
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise ConvscopeError(f"occlusion takes one image (C, H, W), got shape {tuple(image.shape)}")
    check_images(model, image.unsqueeze(0))
    check_int(batch_size, "batch_size", 1, 1 << 16)
    image = image.detach()
    positions = square_positions(image.shape[-2], image.shape[-1], size, stride)
    fill = as_fill(fill, model, image)
    module = site(model, layer)

    with eval_mode(model), torch.inference_mode():
        act, logits = run_to_all(model, [module, model], image.unsqueeze(0), keep=torch.clone)
        probs = logits.softmax(-1)
        if not 0 <= int(label) < probs.shape[-1]:
            raise ConvscopeError(f"label {label} out of range: the model has {probs.shape[-1]} classes")
        # The map holding the strongest single activation, as Projector picks it.
        channel = int(act.flatten(1).argmax(1)) // (act[0, 0].numel() if act.dim() > 2 else 1)
        totals = map_totals(act)
        corners = positions.flatten(0, 1)
        passes, used, note = occluded_passes(model, image, module, corners, size, fill, method, approx)
        b, d, e = [], [], []
        for start in range(0, len(corners), batch_size):
            t, p = passes(corners[start : start + batch_size])
            b.append(t[:, channel])
            d.append(p[:, label])
            e.append(p.argmax(-1))
    grid = positions.shape[:2]
    projection = Projector(model, rule, nonlinearities).project(image.unsqueeze(0), layer, channel=channel)[0]
    return OcclusionResult(
        image=image, label=int(label), layer=layer, channel=channel, size=size, stride=stride, fill=fill,
        positions=positions, activation=torch.cat(b).view(grid), projection=projection,
        prob=torch.cat(d).view(grid), top_class=torch.cat(e).view(grid),
        prob_clean=float(probs[0, label]), activation_clean=float(totals[0, channel]), method=used,
        method_note=note, predicted=int(probs[0].argmax()),
    )


def box_hit(result: OcclusionResult, box: Sequence[float]) -> bool:
    """Whether the centre of the square that lowers p(correct) most lies in ``box`` (x0, y0, x1, y1): the check
    of section 4.2 that the model localises the object rather than using its context."""
    y, x = result.most_sensitive()
    cx, cy = x + result.size / 2, y + result.size / 2
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 <= cx <= x1 and y0 <= cy <= y1


def _upsample(values: torch.Tensor, result: OcclusionResult) -> torch.Tensor:
    """A (rows, cols) map as an (H, W) image: each pixel takes the position whose square's centre is nearest,
    so the maps line up with the image as in Fig. 7."""
    h, w = result.image.shape[-2:]
    ys = result.positions[:, 0, 0].float() + result.size / 2
    xs = result.positions[0, :, 1].float() + result.size / 2
    iy = (torch.arange(h).float()[:, None] + 0.5 - ys[None]).abs().argmin(1)
    ix = (torch.arange(w).float()[:, None] + 0.5 - xs[None]).abs().argmin(1)
    return values[iy][:, ix]


def occlusion_figure(results: Sequence[OcclusionResult], classes: Sequence[str] | None = None,
                     note: str | None = None):
    """A matplotlib figure like paper Fig. 7: one row per image; columns (a) the image with the occluder drawn
    at its most sensitive position, (b) total activation of the map, (c) its projection, (d) p(correct class),
    (e) most probable class with a legend of class names."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle


    if not results:
        raise ConvscopeError("occlusion_figure needs at least one result")
    # A bare Figure, not pyplot: no GUI backend is touched, whatever the user's matplotlib is set to.
    fig = Figure(figsize=(17, 3.4 * len(results)))
    axes = fig.subplots(len(results), 5, squeeze=False)
    cmap = colormaps["tab20"]

    def name(k: int) -> str:
        return classes[k] if classes is not None and k < len(classes) else str(k)

    for row, r in zip(axes, results):
        img = r.image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
        extent = (0, r.image.shape[-1], r.image.shape[-2], 0)
        row[0].imshow(img, extent=extent)
        y, x = r.most_sensitive()
        row[0].add_patch(Rectangle((x, y), r.size, r.size, fill=False, edgecolor="red", linewidth=2))
        row[0].set_title(f"(a) {name(r.label)}  p={r.prob_clean:.2f}", fontsize=9)
        im = row[1].imshow(_upsample(r.activation, r).numpy(), cmap="jet", extent=extent)
        fig.colorbar(im, ax=row[1], fraction=0.046)
        row[1].set_title(f"(b) total activation, {r.layer} map {r.channel}", fontsize=9)
        row[2].imshow(to_image(r.projection), extent=extent)
        row[2].set_title(f"(c) {r.layer} map {r.channel} projected", fontsize=9)
        im = row[3].imshow(_upsample(r.prob, r).numpy(), cmap="jet", extent=extent)
        fig.colorbar(im, ax=row[3], fraction=0.046)
        row[3].set_title(f"(d) p({name(r.label)})", fontsize=9)
        present = sorted(set(r.top_class.flatten().tolist()))
        colours = {k: cmap(k % 20) for k in present}  # by class index: one colour per class in every row
        rgb = torch.tensor([[colours[int(k)][:3] for k in line] for line in _upsample(r.top_class, r).tolist()])
        row[4].imshow(rgb.numpy(), extent=extent)
        row[4].legend(handles=[Patch(color=colours[k], label=name(k)) for k in present], fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.0, 1.0))
        row[4].set_title("(e) most probable class", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    if note:
        fig.suptitle(note, fontsize=10)
    fig.tight_layout()
    return fig


@dataclass
class OcclusionResults:
    """Fig. 7 over a run: one :class:`OcclusionResult` per image, the model's class names, and per image whether
    its label is the true class or, where the model has no such class, the model's prediction."""

    images: list[OcclusionResult]
    classes: list[str]
    label_source: list[str]  # "true" or "predicted"
    note: str | None = None
    boxes: torch.Tensor | None = None  # (N, 4) x0, y0, x1, y1 of each image's object; None without ground truth


def compute(run: Run, n: int = 5, split: str | None = None, layer: str | None = None, size: int | None = None,
            stride: int | None = None, batch_size: int = 64, method: str = "auto",
            approx: bool = False) -> OcclusionResults:
    """Fig. 7 for the first ``n`` images of ``split``, tracking the strongest map of ``layer`` (conv5, or the
    model's last stage). Square and stride default to 3/16 and 1/16 of the image side (12 px and 4 px at 64 px;
    the paper does not state them). ``method`` and ``approx`` as :func:`occlusion` takes them."""
    data = run.split(split or run.default_split("test"))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConvscopeError(f"n must be a positive whole number of images, got {n!r}")
    index = torch.arange(min(n, len(data)))
    x = data.batch(index)[0]
    labels, source = run.targets(data, index)
    layer = run.check_layers([layer])[0] if layer is not None else (
        "conv5" if "conv5" in run.paper_names else run.map_layers()[-1])
    default_size, default_stride = default_square(x.shape[-1])
    size = size if size is not None else default_size
    stride = stride if stride is not None else default_stride
    results = [occlusion(run.model, x[i], int(labels[i]), layer=layer, size=size, stride=stride,
                         batch_size=batch_size, nonlinearities=run.nonlinearities, method=method, approx=approx)
               for i in range(len(x))]
    boxes = data.truth.boxes[index].clone() if data.truth is not None else None
    return OcclusionResults(results, list(run.classes), source, gradient_note("deconvnet", run.nonlinearities),
                            boxes)


def write_occlusion(result: OcclusionResults, layout: Layout, name: str = "fig7") -> list[Path]:
    """Write Fig. 7 (``<name>.png``) and its numbers (``<name>.json``: the maps per image) into the run."""
    classes = result.classes
    png = artifacts.save_figure(layout.figure(name), occlusion_figure(result.images, classes, result.note))

    def label(k: int):
        return classes[k] if k < len(classes) else k

    data = [{
        "label": label(r.label), "label_source": src, "layer": r.layer, "channel": r.channel, "size": r.size,
        "stride": r.stride, "fill": r.fill.tolist(), "prob_clean": r.prob_clean,
        "activation_clean": r.activation_clean, "positions": r.positions.tolist(),
        "activation": r.activation.tolist(), "prob": r.prob.tolist(),
        "top_class": [[label(k) for k in line] for line in r.top_class.tolist()],
        "most_sensitive": list(r.most_sensitive()), "method": r.method, "method_note": r.method_note,
    } for r, src in zip(result.images, result.label_source)]
    js = artifacts.write_json(layout.figure(name, ".json"), {"figure": "Zeiler & Fergus Fig. 7", "images": data})
    return [png, js]


def findings(result: OcclusionResults, analysis: str = "fig7") -> list[Finding]:
    """Zeiler & Fergus Fig. 7: occlusion finds the object. Over the images classified correctly (true label, known
    box), the share whose most harmful square (lowest p(correct class)) has its centre in the object's box, minus
    the share expected by chance: the mean fraction of square positions whose centre lies in the box. Empty
    without ground-truth boxes."""
    if result.boxes is None:
        return []
    hits, chance = [], []
    for r, src, box in zip(result.images, result.label_source, result.boxes):
        if src != "true" or r.predicted != r.label or torch.isnan(box).any():
            continue
        hits.append(box_hit(r, box))
        # Chance: were the most harmful square any position at random, its centre would fall in the box this often.
        x, y = r.centres().unbind(-1)
        x0, y0, x1, y1 = (float(v) for v in box)
        chance.append(float(((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)).float().mean()))
    if not hits:
        return []
    null = sum(chance) / len(chance)
    return [finding(f"{analysis}.on_object", "Occlusion finds the object: the square that lowers p(correct class) "
                    "most lies on the object (its centre in the object's box)", "Zeiler & Fergus 2014, Fig. 7",
                    analysis, proportion_contrast(sum(hits), len(hits), null, unit="correctly classified images"),
                    "share of images with the most harmful square in the box - chance (share of positions there)",
                    "qualitative: p(correct class) drops significantly when the object is occluded",
                    f"{sum(hits)} of {len(hits)} in the box (chance {null:.2f})")]


def unit_panel(layout: Layout, layer: str, unit: int, query=None) -> Panel | None:
    """The images of Fig. 7 whose tracked map is this unit: each one's label, its clean activation and the lowest
    under the grey square (from ``fig7.json``)."""
    saved = artifacts.read_json(layout.figure("fig7", ".json"))
    images = saved.get("images") if isinstance(saved, dict) else None
    seen = []
    for i, im in enumerate(images if isinstance(images, list) else []):
        if not (isinstance(im, dict) and im.get("layer") == layer and im.get("channel") == unit):
            continue
        grid, clean = im.get("activation"), im.get("activation_clean")
        values = [v for row in grid if isinstance(row, list) for v in row] if isinstance(grid, list) else []
        values = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        text = f"image {i} ({printable(str(im.get('label', '?')))}"
        if isinstance(clean, int | float) and not isinstance(clean, bool):
            text += f": {clean:.3g}, down to {f'{min(values):.3g}' if values else '?'} under the grey square"
        seen.append(text + ")")
    if not seen:
        return None
    return Panel([Line("Occlusion (", f") tracked this unit in {'; '.join(seen)}.", "fig7", "Fig. 7", id="occluded")])


register(Analysis(
    "occlusion", "fig7", "Fig. 7", "Occlusion sensitivity",
    "A grey square slid over the image: (b) total activation of the strongest layer-5 map, (c) its "
    "projection, (d) probability of the correct class, (e) most probable class, per occluder position.",
    files=figure_files("fig7"), compute=compute, projects=True, findings=findings,
    write=write_occlusion,
    help={"n": "How many images (the first of the split).", "split": SPLIT_HELP,
          "layer": "Layer whose strongest map is tracked (b, c). [conv5, or the model's last stage]",
          "size": "Side of the grey square in pixels. [3/16 of the image]",
          "stride": "Step between squares in pixels. [1/16 of the image]",
          "batch_size": "Occluded images per forward pass.",
          "method": "auto (incremental where it is exact on the model, else dense), incremental (Krypton: "
                    "each layer recomputed only where the square reaches) or dense (a full pass per "
                    "position). The same numbers to float rounding.",
          "approx": "Truncate the incremental change to a fraction of each map (Krypton's projective-field "
                    "threshold): faster, approximate."},
    unit_panel=unit_panel))


__all__ = ["OcclusionResult", "OcclusionResults", "box_hit", "compute", "findings", "occlusion", "occlusion_figure",
           "unit_panel", "write_occlusion"]
