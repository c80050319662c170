"""Correspondence of object parts (paper section 4.2, Table 1).

Take ``n`` images of one class (the paper: 5 frontal dogs; convscope's embedded data: 5 faces) and mask the
same named part in each (a grey square of ``size`` pixels centred on the part), or a random region of the same
size in each. With ``x_i`` and ``x~_i`` the feature vectors of layer ``l`` for the original and the masked
image, ``eps_i = x_i - x~_i``. If the network encodes the part consistently, masking it changes the features
of every image in the same direction, and the signs of the ``eps_i`` agree. The paper's measure, written out
so that its values (about 0.07) come out as a mean sign change, is::

    Delta_l = 1 / (n (n - 1) D) * sum over ordered pairs i != j of Hamming(sign(eps_i), sign(eps_j))

with ``D`` the length of the feature vector and ``Hamming`` the number of positions where the signs differ
(``sign(0) = 0``, so a unit that no mask moves counts as agreeing). Lower is more consistent.

Random regions: the paper compares with "random object parts". A random region is drawn independently in each
image (a region that corresponds across images would be a part); its centre is uniform inside the object's
box when boxes are known (the embedded data), otherwise anywhere the square fits in the image.

Spread: ``draws`` repetitions, each with its own seeded draw of the ``n`` images (from the candidates given) and
of the random regions; the table reports mean and standard deviation over the draws. Layers default to conv5
and fc7 (the paper's layers 5 and 7), each the rectified output.

Own images: :func:`load_parts_json` reads ``{"images": ["a.png", ...], "parts": {"left_eye": [[x, y], ...],
...}}`` (image paths relative to the JSON file, one ``[x, y]`` pixel location per image and part, ``null`` where
an image lacks the part; optional ``"boxes": [[x0, y0, x1, y1], ...]`` for the random regions).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import artifacts
from .analyses import SPLIT_HELP, Analysis, existing, register
from .errors import ConvscopeError, check_int, check_seed, unknown
from .findings import Finding, finding, paired_contrast
from .forward import check_images, eval_mode, run_to_all
from .imaging import pil_to_tensor
from .layers import site
from .layout import Layout
from .occluders import as_fill, occlude
from .tables import TextTable

if TYPE_CHECKING:
    from .run import Run

RANDOM = "random"
FACE_PARTS = ("left_eye", "right_eye", "nose")


@dataclass
class PartImages:
    """Images (N, C, H, W) in [0, 1] with named part locations: name -> (N, 2) pixel (x, y), NaN where absent;
    ``boxes`` (N, 4) x0, y0, x1, y1 of the object, if known."""

    images: torch.Tensor
    parts: dict[str, torch.Tensor]
    boxes: torch.Tensor | None = None


@dataclass
class CorrespondenceResult:
    """Paper Table 1. ``values[region][layer]`` holds Delta for every draw (draws,); ``mean``/``std`` summarise
    them. Regions are the part names then ``"random"``."""

    layers: tuple[str, ...]
    regions: tuple[str, ...]
    values: dict[str, dict[str, torch.Tensor]]
    size: int
    n_images: int
    draws: int
    seed: int

    @property
    def mean(self) -> dict[str, dict[str, float]]:
        return {r: {k: float(v.mean()) for k, v in d.items()} for r, d in self.values.items()}

    @property
    def std(self) -> dict[str, dict[str, float]]:
        return {r: {k: float(v.std(unbiased=False)) for k, v in d.items()} for r, d in self.values.items()}


def delta(eps: torch.Tensor) -> float:
    """The paper's Delta for feature differences ``eps`` (n, D): the mean over ordered pairs i != j of the
    fraction of positions where sign(eps_i) and sign(eps_j) differ."""
    n = eps.shape[0]
    if n < 2:
        raise ConvscopeError(f"Delta needs at least 2 images, got {n}")
    signs = eps.flatten(1).sign()
    differ = (signs[:, None, :] != signs[None, :, :]).sum(-1).double()  # (n, n); zero on the diagonal
    return float(differ.sum() / (n * (n - 1) * signs.shape[1]))


def mask_squares(images: torch.Tensor, centres: torch.Tensor, size: int, fill: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W) with a ``size`` square of ``fill`` centred on each image's (x, y) in ``centres``
    (N, 2), clipped at the edges: it covers pixels ``floor(x - size / 2)`` to that + size - 1 (and so in y)."""
    corners = torch.floor(centres.flip(-1).double() - size / 2).long()
    return occlude(images, corners, size, fill)


def _random_centres(n: int, h: int, w: int, size: int, boxes: torch.Tensor | None,
                    g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    if boxes is None:
        lo = torch.tensor([size / 2, size / 2], dtype=torch.float64)
        hi = torch.tensor([w - size / 2, h - size / 2], dtype=torch.float64)
    else:
        lo, hi = boxes[:, :2].double(), boxes[:, 2:].double()
    return (lo + u * (hi - lo)).float()


def correspondence(
    model: nn.Module,
    data: PartImages,
    parts: Sequence[str] = FACE_PARTS,
    layers: Sequence[str] = ("conv5", "fc7"),
    size: int | None = None,
    n_images: int = 5,
    draws: int = 10,
    seed: int = 0,
    fill=None,
) -> CorrespondenceResult:
    """Paper Table 1: Delta per part (and for random regions) and layer, mean and spread over ``draws``.

    ``data`` holds the candidate images of one class with their part locations (:func:`class_parts` for the
    embedded data, :func:`load_parts_json` for one's own). Each draw takes ``n_images`` of them at random (all,
    in order, when there are exactly ``n_images``; then only the random regions vary between draws). ``size``
    is the mask's side in pixels (default: an eighth of the image side, 8 px at 64 px); ``fill`` its colour
    (default: the data's mean colour).
    """
    images = data.images.detach()
    check_images(model, images)
    n_total, h = len(images), images.shape[-2]
    valid = [name for name, xy in data.parts.items() if not torch.isnan(xy).any()]
    parts = list(parts)
    if not parts:
        raise ConvscopeError(f"no parts named: name one or more of {', '.join(valid) or '(none located)'}")
    for name in parts:
        if name not in valid:
            raise unknown("part", name, valid or ["(none: no part is located in every image)"])
    if n_images < 2 or n_total < 2:
        raise ConvscopeError(f"correspondence needs at least 2 images (got n_images={n_images}, "
                             f"{n_total} images given)")
    if n_images > n_total:
        raise ConvscopeError(f"n_images={n_images} but only {n_total} images were given: choose 2..{n_total}")
    check_int(draws, "draws", 1, 100_000)
    size = max(1, round(h / 8)) if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(images.shape[-2:]):
        raise ConvscopeError(f"mask size must be an integer from 1 to {min(images.shape[-2:])} pixels, got {size!r}")
    layers = tuple(layers)
    modules = [site(model, layer) for layer in layers]
    fill = as_fill(fill, model, images)
    g = torch.Generator().manual_seed(seed)
    regions = (*parts, RANDOM)
    values = {r: {layer: torch.empty(draws, dtype=torch.float64) for layer in layers} for r in regions}

    def features(x: torch.Tensor) -> list[torch.Tensor]:
        return [a.flatten(1) for a in run_to_all(model, modules, x)]

    with eval_mode(model), torch.inference_mode():
        for d in range(draws):
            pick = torch.arange(n_total) if n_images == n_total else torch.randperm(n_total, generator=g)[:n_images]
            x = images[pick]
            boxes = data.boxes[pick] if data.boxes is not None else None
            centres = {name: data.parts[name][pick] for name in parts}
            centres[RANDOM] = _random_centres(n_images, h, images.shape[-1], size, boxes, g)
            # One forward pass for the originals and every masked set.
            batch = torch.cat([x] + [mask_squares(x, centres[r], size, fill) for r in regions])
            feats = [f.view(len(regions) + 1, n_images, -1) for f in features(batch)]
            for layer, f in zip(layers, feats):
                for k, r in enumerate(regions, start=1):
                    values[r][layer][d] = delta(f[0] - f[k])
    return CorrespondenceResult(layers=layers, regions=regions, values=values, size=size, n_images=n_images,
                                draws=draws, seed=seed)


def class_parts(dataset, class_name: str = "face") -> PartImages:
    """The images of one class of an :class:`~convscope.data.base.ImageSet` with ground truth (the embedded
    data), with their part locations (only the parts that class has) and boxes."""
    if dataset.truth is None:
        raise ConvscopeError("this data set has no part locations: use load_parts_json for your own images")
    if class_name not in dataset.classes:
        raise unknown("class", class_name, dataset.classes)
    index = torch.nonzero(dataset.labels == dataset.classes.index(class_name)).flatten()
    if len(index) == 0:
        raise ConvscopeError(f"the data set has no images of class {class_name!r}")
    images, _ = dataset.batch(index)
    parts = {k: v[index] for k, v in dataset.truth.parts.items() if not torch.isnan(v[index]).all()}
    return PartImages(images, parts, dataset.truth.boxes[index])


def load_parts_json(path: str | os.PathLike, size: int | None = None) -> PartImages:
    """One's own images with part locations, from a JSON file (format in the module doc). ``size`` resizes
    every image to ``size`` x ``size`` (locations scaled alike); otherwise all images must have one size."""
    from PIL import Image, UnidentifiedImageError


    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConvscopeError(f"parts file {str(path)!r} does not exist") from e
    except (OSError, ValueError) as e:
        raise ConvscopeError(f"parts file {str(path)!r} is not readable JSON ({e})") from e
    example = '{"images": ["a.png", ...], "parts": {"left_eye": [[x, y], ...], ...}}'
    if not isinstance(spec, dict) or not isinstance(spec.get("images"), list) or not isinstance(
            spec.get("parts"), dict):
        raise ConvscopeError(f"parts file {str(path)!r} must look like {example}")
    files = spec["images"]
    tensors, scales = [], []
    for name in files:
        try:
            with Image.open(path.parent / str(name)) as im:
                w, h = im.size
                if size is not None:
                    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                tensors.append(pil_to_tensor(im))
        except (OSError, UnidentifiedImageError) as e:
            raise ConvscopeError(f"image {str(name)!r} listed in {str(path)!r} cannot be read ({e})") from e
        scales.append((size / w, size / h) if size is not None else (1.0, 1.0))
    if len({t.shape for t in tensors}) > 1:
        raise ConvscopeError(f"the images in {str(path)!r} differ in size: pass size= to resize them")
    scale = torch.tensor(scales, dtype=torch.float32)

    def table(key: str, values, width: int) -> torch.Tensor:
        if not isinstance(values, list) or len(values) != len(files):
            raise ConvscopeError(f"{key!r} in {str(path)!r} must list one entry per image ({len(files)})")
        rows = []
        for v in values:
            if v is None:
                rows.append([float("nan")] * width)
            elif isinstance(v, list) and len(v) == width and all(isinstance(c, (int, float)) for c in v):
                rows.append([float(c) for c in v])
            else:
                raise ConvscopeError(f"{key!r} in {str(path)!r}: expected {width} numbers or null, got {v!r}")
        return torch.tensor(rows, dtype=torch.float32).view(len(files), width)

    parts = {str(k): table(k, v, 2) * scale for k, v in spec["parts"].items()}
    boxes = table("boxes", spec["boxes"], 4) * scale.repeat(1, 2) if "boxes" in spec else None
    images = torch.stack(tensors) if tensors else torch.empty(0, 3, 1, 1)
    return PartImages(images, parts, boxes)


def correspondence_table(result: CorrespondenceResult) -> str:
    """Table 1 as text (markdown): one row per region, ``mean +- std`` per layer."""
    mean, std = result.mean, result.std
    return TextTable(("region", *(f"Delta {layer}" for layer in result.layers)),
                     tuple((r, *(f"{mean[r][k]:.4f} +- {std[r][k]:.4f}" for k in result.layers))
                           for r in result.regions),
                     f"{result.n_images} images, {result.size} px masks, {result.draws} draws (seed {result.seed}); "
                     "Delta = mean sign change over ordered pairs (Zeiler & Fergus Table 1)").markdown()


def write_correspondence(result: CorrespondenceResult, layout: Layout, name: str = "table1", heading: str = ""
                         ) -> list[Path]:
    """Write Table 1 as ``<name>.json`` (every draw, mean, std) and ``<name>.txt`` (the table, under ``heading``:
    which model and data, where they are not the run's own) into the run."""
    data = {
        "table": "Zeiler & Fergus Table 1", "heading": heading, "layers": list(result.layers),
        "regions": list(result.regions),
        "size": result.size, "n_images": result.n_images, "draws": result.draws, "seed": result.seed,
        "delta": "mean over ordered pairs i != j of the fraction of positions where sign(eps_i) != sign(eps_j)",
        "mean": result.mean, "std": result.std,
        "values": {r: {k: v.tolist() for k, v in d.items()} for r, d in result.values.items()},
    }
    return [artifacts.write_json(layout.figure(name, ".json"), data),
            artifacts.write_text(layout.figure(name, ".txt"), (heading + "\n\n" if heading else "")
                                 + correspondence_table(result))]


def compute(run: Run, class_name: str = "face", parts: list[str] | None = None, split: str | None = None,
            draws: int = 10, size: int | None = None, seed: int = 0, parts_json: str | None = None
            ) -> CorrespondenceResult:
    """Table 1: Delta for masked parts and random regions at layer 5 and layer 7 (conv5 and fc7, or the model's
    last stage and penultimate module), on 5 images of one class of the embedded data (their ground-truth part
    locations), or on the user's images and parts (``parts_json``)."""
    check_seed(seed)
    if parts_json is not None:
        images = load_parts_json(parts_json, size=run.image_size)
        parts = list(images.parts) if parts is None else parts
    else:
        images = class_parts(run.split(split or run.default_split("test")), class_name)
        parts = list(FACE_PARTS) if parts is None else parts
    paper = run.paper_names
    layers = ("conv5", "fc7") if {"conv5", "fc7"} <= set(paper) else (run.map_layers()[-1], run.vector_layer())
    return correspondence(run.model, images, parts=parts, layers=layers, draws=draws, seed=seed, size=size)


# Table 1 of the paper: Delta at layers 5 and 7 per masked region (mean over its 5 dogs).
PAPER_TABLE1 = {5: {"right_eye": 0.067, "left_eye": 0.069, "nose": 0.079, RANDOM: 0.107},
                7: {"right_eye": 0.069, "left_eye": 0.068, "nose": 0.069, RANDOM: 0.073}}


def findings(result: CorrespondenceResult, analysis: str = "table1", data: str = "") -> list[Finding]:
    """Zeiler & Fergus Table 1: masking a part moves the features more consistently than masking a random region.
    Per layer and part, the contrast ``Delta(random) - Delta(part)`` over the paired draws (draw d masks the same
    images for every region). ``data`` names the data set in the claim (e.g. ``synthetic-parts``); ``analysis``
    prefixes the keys (``<analysis>.<layer>.<part>``)."""
    out = []
    on = f" on {data}" if data else ""
    for k, layer in enumerate(result.layers):
        # The paper's layers 5 and 7: by name on built-in nets, else the first and last of the two probed.
        paper_layer = {"conv5": 5, "fc7": 7}.get(layer, (5, 7)[k] if len(result.layers) == 2 else None)
        paper = PAPER_TABLE1.get(paper_layer, {})
        rand = result.values[RANDOM][layer]
        for part in result.regions:
            if part == RANDOM:
                continue
            mine, name = result.values[part][layer], part.replace("_", " ")
            claim = (f"Masking the {name} changes {layer}'s features in a more consistent direction than masking a "
                     f"random region (lower Delta){on}")
            if part in paper:
                note = " (no difference at layer 7)" if paper_layer == 7 else ""
                paper_text = f"layer {paper_layer}: {paper[part]:.3f} vs {paper[RANDOM]:.3f}{note}"
            else:
                paper_text = "not in the paper (eyes and nose only)" if paper else "layers 5 and 7 only"
            out.append(finding(f"{analysis}.{layer}.{part}", claim, "Zeiler & Fergus 2014, Table 1", analysis,
                               paired_contrast(rand, mine), "Delta(random) - Delta(part)", paper_text,
                               f"{float(mine.mean()):.3g} vs {float(rand.mean()):.3g}"))
    return out


register(Analysis(
    "correspondence", "table1", "Table 1", "Correspondence of object parts",
    "The same part masked in 5 images of one class, or random regions: Delta, the mean sign change of the "
    "feature differences over image pairs. Lower than random means the parts are encoded consistently.",
    files=lambda layout: ([], existing(layout.figure("table1", ".txt"), layout.figure("table1_parts", ".txt"))),
    compute=compute, findings=findings,
    write=write_correspondence,
    help={"class_name": "Class of the embedded data.", "parts": "Comma-separated part names. "
          "[left_eye,right_eye,nose]", "split": SPLIT_HELP, "draws": "Random draws of images and regions.",
          "size": "Side of the masking square. [1/8 of the image]", "seed": "Seed of the draws.",
          "parts_json": 'Your own images and parts: {"images": ["a.png", ...], "parts": {"left_eye": '
                        '[[x, y], ...]}}.'},
    flags={"class_name": "--class"}, summary=correspondence_table,
    paper=[("layer 5: right eye / left eye / nose",
            " / ".join(str(PAPER_TABLE1[5][p]) for p in ("right_eye", "left_eye", "nose"))),
           ("layer 5: random regions", str(PAPER_TABLE1[5][RANDOM])),
           ("layer 7: eyes, nose and random", f"{min(PAPER_TABLE1[7].values())} - {max(PAPER_TABLE1[7].values())}")]))


__all__ = ["FACE_PARTS", "RANDOM", "CorrespondenceResult", "PartImages", "class_parts", "compute", "correspondence",
           "delta", "findings", "correspondence_table", "load_parts_json", "mask_squares", "write_correspondence"]
