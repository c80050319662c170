"""The pointing game (Zhang et al., "Top-down neural attention by excitation backprop", 2016), as TorchRay runs
it: does the maximum of a method's map for a class fall on that class's object?

TorchRay's protocol, followed here: a class's map is the input gradient of the class's logit seeded with 1
(deconvnet, guided backprop or the plain gradient: convscope's one engine), made a saliency map by the largest
absolute value over colour channels and smoothed by a Gaussian of sigma 0.02 x the image side; its maximum (the
first in row-major order) is the point. The point hits when any pixel of the object lies closer than the
tolerance: 15 px at 224 px, scaled to the image. Accuracy is the mean over classes of hits / (hits + misses).
Beside the gradient methods: occlusion (the centre of the grey square that lowers p(class) most, the same
squares as Fig. 7) and the centre baseline (the image centre, which any method should beat). The "difficult"
images are those where the object covers less than a quarter of the image and its centroid lies more than an
eighth of the image side from the centre.

TorchRay's published numbers (VGG-16 on PASCAL VOC07 test, all / difficult): centre 69.6 / 42.4, gradient
76.3 / 56.9, deconvnet 67.5 / 44.2, guided 75.9 / 53.0. The embedded synthetic data has the object masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .analyses import SPLIT_HELP, Analysis, existing, register
from .data.folder import read_image
from .deconvnet import Projector
from .errors import ConvscopeError, check_int
from .findings import finding, paired_contrast
from .forward import eval_mode
from .layout import Layout
from .occluders import default_square, occluded_probs
from .tables import TextTable

if TYPE_CHECKING:
    from .run import Run

METHODS = ("center", "deconvnet", "guided", "gradient", "occlusion")
TORCHRAY_VOC07 = {"center": (69.6, 42.4), "gradient": (76.3, 56.9), "deconvnet": (67.5, 44.2),
                  "guided": (75.9, 53.0)}  # VGG-16, all / difficult (%), TorchRay's docs/pointing.csv


def tolerance(side: int) -> float:
    """TorchRay's 15 px at 224 px, scaled to an image of ``side`` px."""
    return 15 * side / 224


def hits(masks: torch.Tensor, points: torch.Tensor, tol: float) -> torch.Tensor:
    """(N,) bool: whether point i (x, y) lies closer than ``tol`` (strictly) to a pixel of mask i (N, H, W)."""
    n, h, w = masks.shape
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    px, py = points[:, 0].float().view(n, 1, 1), points[:, 1].float().view(n, 1, 1)
    accept = (ys - py) ** 2 + (xs - px) ** 2 < tol ** 2
    return (masks.bool() & accept).flatten(1).any(1)


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """TorchRay's imsmooth: a separable Gaussian (half-width ceil(4 sigma), summing to one) over (N, 1, H, W),
    the border replicated."""
    width = math.ceil(4 * sigma)
    x = torch.arange(-width, width + 1, dtype=torch.float32) / (math.sqrt(2) * sigma + 1.1920929e-07)
    f = torch.exp(-x * x)
    f = f / f.sum()
    maps = F.pad(maps, (width, width, width, width), mode="replicate")
    maps = F.conv2d(maps, f.view(1, 1, -1, 1))
    return F.conv2d(maps, f.view(1, 1, 1, -1))


def argmax_points(maps: torch.Tensor) -> torch.Tensor:
    """(N, 2) (x, y) of each map's maximum (N, 1, H, W), the first in row-major order."""
    w = maps.shape[-1]
    k = maps.flatten(1).argmax(1)
    return torch.stack([k % w, k // w], dim=1)


def gradient_points(model: nn.Module, output: str, n_classes: int, images: torch.Tensor, classes: torch.Tensor,
                    rule: str, nonlinearities: str = "error") -> torch.Tensor:
    """Each image's point for its class under ``rule``: the logit (module ``output``, ``n_classes`` wide) seeded
    with 1, the projection made a saliency map and smoothed as TorchRay does."""
    seed = torch.zeros(len(images), n_classes)
    seed[torch.arange(len(images)), classes] = 1.0
    grad = Projector(model, rule, nonlinearities).project(images, output, grad_output=seed)
    saliency = grad.abs().amax(1, keepdim=True)
    return argmax_points(smooth(saliency, 0.02 * max(images.shape[-2:])))


def occlusion_points(model: nn.Module, image: torch.Tensor, classes: list[int], size: int, stride: int,
                     batch_size: int = 64) -> list[torch.Tensor]:
    """For one image, per class of ``classes``: the centre (x, y) of the square that lowers p(class) most."""
    positions, probs, _ = occluded_probs(model, image, size, stride, batch_size)
    corners = positions.flatten(0, 1)
    return [corners[int(probs[:, c].argmin())].flip(0).float() + size / 2 for c in classes]


@dataclass
class PointingResult:
    """Per method and target ("true": the image's class; "predicted": the model's), the hits per image; the
    images' classes, which are difficult, and the tolerance."""

    hits: dict[str, dict[str, torch.Tensor]]
    labels: torch.Tensor
    difficult: torch.Tensor
    classes: list[str]
    tol: float
    side: int

    def accuracy(self, method: str, target: str = "true", subset: torch.Tensor | None = None) -> float:
        """The mean over classes of hits / (hits + misses) (TorchRay), on ``subset`` of the images."""
        keep = torch.ones_like(self.labels, dtype=torch.bool) if subset is None else subset
        h = self.hits[method][target][keep].float()
        lab = self.labels[keep]
        per_class = [h[lab == c].mean().item() for c in lab.unique().tolist()]
        return sum(per_class) / len(per_class) if per_class else float("nan")

    def table(self) -> dict:
        return {m: {t: {"all": self.accuracy(m, t), "difficult": self.accuracy(m, t, self.difficult)}
                    for t in self.hits[m]} for m in self.hits}


def findings(result: PointingResult) -> list:
    """The pointing game's claim (Zhang et al. 2016; Fong et al. 2019, TorchRay), per gradient method and
    occlusion: the method's map points at the true class's object more often than the image centre does.
    Contrast: its accuracy minus the centre's, paired over images; each image's hit is weighted by
    N / (classes x its class's images), so the mean is TorchRay's mean over classes (the table's number)."""

    if "center" not in result.hits:
        return []
    labels = result.labels.long()
    counts = torch.bincount(labels).double()
    weight = len(labels) / (int((counts > 0).sum()) * counts[labels])  # 1 for every image when classes are even
    centre = result.hits["center"]["true"].double() * weight
    out = []
    for method in METHODS[1:]:
        if method not in result.hits:
            continue
        contrast = paired_contrast(result.hits[method]["true"].double() * weight, centre, "images")
        ref = TORCHRAY_VOC07.get(method)
        out.append(finding(
            f"pointing.{method}", f"{method}'s map points at the object more often than the image centre does",
            "Zhang et al. 2016 / Fong et al. 2019 (TorchRay), pointing game", "pointing", contrast,
            "accuracy(method) - accuracy(centre), true class, mean over classes",
            f"VOC07, VGG-16: {ref[0]:.1f}% vs centre {TORCHRAY_VOC07['center'][0]:.1f}%" if ref else
            "not in TorchRay's table",
            f"{100 * result.accuracy(method):.1f}% vs centre {100 * result.accuracy('center'):.1f}% "
            f"({len(labels)} images)"))
    return out


def read_masks(data, index: torch.Tensor, folder: str | Path, side: int) -> torch.Tensor:
    """The object masks of images ``index`` of an image folder: ``folder/<class>/<image name>.png``, white where
    the object is, read at the images' size as the images are (short side scaled, centre crop). (N, H, W) bool."""

    sources = getattr(data, "sources", None)
    if not sources:
        raise ConvscopeError(f"--masks names files by the images' own paths; data {data.name!r} has no image files")
    out = []
    for i in index.tolist():
        image = Path(sources[i])
        path = Path(folder) / image.parent.name / f"{image.stem}.png"
        try:
            out.append(read_image(path, side).float().mean(0) > 127)
        except (OSError, ValueError, SyntaxError) as e:
            raise ConvscopeError(f"no readable mask for {image.parent.name}/{image.name}: {path} "
                                 f"({type(e).__name__}); --masks holds one PNG per image, <class>/<image name>.png, "
                                 "white on the object") from None
    return torch.stack(out)


def compute(run: Run, n: int = 300, split: str | None = None, masks: str | None = None, batch_size: int = 50,
            progress: bool | None = None) -> PointingResult:
    """The pointing game on the first ``n`` images of ``split`` for the true and the predicted class, every method
    of :data:`METHODS`. The objects' masks are the embedded data's own, or your PNGs in the folder ``masks``
    (:func:`read_masks`)."""
    check_int(n, "n", 1, 100000)
    check_int(batch_size, "batch_size", 1, 65536)
    data = run.split(split or run.default_split("test"))
    index = torch.arange(min(n, len(data)))
    x, _ = data.batch(index)
    if masks is not None:
        masks = read_masks(data, index, masks, x.shape[-1])
    elif getattr(data, "truth", None) is not None:
        masks = data.truth.masks[index]
    else:
        raise ConvscopeError(f"the pointing game needs each image's object mask; data {data.name!r} has none: pass "
                             "--masks FOLDER (<class>/<image name>.png, white on the object), or use the embedded "
                             "synthetic data, which has them")
    labels, _ = run.targets(data, index)
    with torch.no_grad(), eval_mode(run.model):
        predicted = torch.cat([run.model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])
    side = x.shape[-1]
    tol = tolerance(side)
    targets = {"true": labels, "predicted": predicted}
    centre = torch.tensor([[x.shape[-1] / 2, x.shape[-2] / 2]]).expand(len(x), 2)
    found: dict[str, dict[str, torch.Tensor]] = {"center": {t: hits(masks, centre, tol) for t in targets}}
    output = run.output_layer()
    bar = tqdm(total=3 * 2 * len(x) + len(x), desc="pointing", unit="map",
               disable=None if progress is None else not progress)
    for rule in ("deconvnet", "guided", "gradient"):
        found[rule] = {}
        for t, cls in targets.items():
            points = []
            for start in range(0, len(x), batch_size):
                points.append(gradient_points(run.model, output, len(run.classes), x[start:start + batch_size],
                                              cls[start:start + batch_size], rule, run.nonlinearities))
                bar.update(len(points[-1]))
            found[rule][t] = hits(masks, torch.cat(points), tol)
    size, stride = default_square(side)
    occluded = {t: [] for t in targets}
    for i in range(len(x)):
        pts = occlusion_points(run.model, x[i], [int(labels[i]), int(predicted[i])], size, stride)
        occluded["true"].append(pts[0])
        occluded["predicted"].append(pts[1])
        bar.update(1)
    bar.close()
    found["occlusion"] = {t: hits(masks, torch.stack(p), tol) for t, p in occluded.items()}
    area = masks.flatten(1).float().mean(1)
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(x.shape[-1], dtype=torch.float32),
                            indexing="ij")
    weight = masks.float().flatten(1).sum(1).clamp_min(1)
    cy = (masks.float() * ys).flatten(1).sum(1) / weight
    cx = (masks.float() * xs).flatten(1).sum(1) / weight
    off_centre = ((cy - (side - 1) / 2) ** 2 + (cx - (x.shape[-1] - 1) / 2) ** 2).sqrt() > side / 8
    difficult = (area < 0.25) & off_centre
    return PointingResult(found, labels, difficult, list(run.classes), tol, side)


def pointing_table(result: PointingResult) -> str:
    """The accuracies (%) beside TorchRay's VGG-16 on VOC07."""
    t = result.table()
    rows = []
    for m in METHODS:
        ref = TORCHRAY_VOC07.get(m)
        rows.append((m, *(f"{100 * t[m][c][s]:.1f}" for c in ("true", "predicted") for s in ("all", "difficult")),
                     *((f"{ref[0]:.1f}", f"{ref[1]:.1f}") if ref else ("-", "-"))))
    return TextTable(("method", "true class: all", "difficult", "predicted class: all", "difficult",
                      "TorchRay VOC07 (VGG-16): all", "TorchRay: difficult"), tuple(rows),
                     f"{len(result.labels)} images ({int(result.difficult.sum())} difficult: object under a "
                     "quarter of the image, its centroid over 1/8 of the side off centre), tolerance "
                     f"{result.tol:.1f} px at {result.side} px (15 at 224); accuracy (%) is the mean over classes."
                     ).markdown()


def write_pointing(result: PointingResult, layout: Layout) -> list[Path]:
    """``pointing.json`` (accuracies and per-image hits) and ``pointing.md`` (the table) in the run's figures."""
    numbers = {"accuracy": result.table(), "torchray_voc07_vgg16": TORCHRAY_VOC07, "tolerance_px": result.tol,
               "image_size": result.side, "labels": result.labels.tolist(), "difficult": result.difficult.tolist(),
               "hits": {m: {t: h.tolist() for t, h in v.items()} for m, v in result.hits.items()}}
    return [artifacts.write_json(layout.figure("pointing", ".json"), numbers),
            artifacts.write_text(layout.figure("pointing", ".md"), pointing_table(result))]


register(Analysis(
    "pointing", "pointing", "TorchRay's pointing game", "Does a class's map point at its object?",
    "Not in the paper: for each image and its class (true, and predicted), the maximum of each method's map "
    "(deconvnet, guided, gradient: TorchRay's protocol; occlusion; the image centre as the baseline) is a hit "
    "when it lies within 15 px at 224 of the object. Mean accuracy over classes, on all images and on the "
    "difficult ones (small, off-centre objects), beside TorchRay's VGG-16 on VOC07, where the deconvnet is "
    "below the centre baseline.",
    files=lambda layout: ([], existing(layout.figure("pointing", ".md"))), compute=compute,
    write=write_pointing, projects=True, findings=findings,
    help={"n": "How many images (the first of the split).", "split": SPLIT_HELP,
          "masks": "A folder of object masks for your own images: <class>/<image name>.png, white on the "
                   "object. [the embedded data's own masks]",
          "batch_size": "Images per forward and backward pass."},
    summary=pointing_table))


__all__ = ["METHODS", "PointingResult", "compute", "findings", "hits", "pointing_table", "smooth", "tolerance",
           "write_pointing"]
