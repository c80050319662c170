"""What each unit detects, measured: network dissection (Bau et al., CVPR 2017) on the run's own model and images.

Fig. 2 leaves the reading of a unit to the eye; dissection measures it. Each unit's maps are thresholded at the
top ``quantile`` (0.5%) of its activations over the data set, upsampled (bilinear) to the image, and compared with
every concept's pixel masks: the intersection over union summed over the data set. The unit's label is its best
concept, kept where the IoU exceeds 0.04 (NetDissect's numbers). The procedure follows NetDissect-Lite's
``feature_operation.py``, with two differences, both exact rather than approximate: the threshold is the exact
quantile of the unit's activations (numpy's linear rule), not a sampled sketch; and a unit's area enters the
union of a category's concepts over the images where that category is annotated (every image, for the embedded
set), where NetDissect-Lite counts it only in images where the unit's region touches a label of that category,
which lifts the IoU of units that fire elsewhere.

The concepts of the embedded data set are rendered, not annotated (:func:`convscope.data.synthetic.concept_maps`):
Broden's five categories, object, part, shape, colour and texture; your own images take a folder of masks
(:func:`user_concepts`). One forward pass over the images keeps, per unit, the activations above the running
quantile (0.5% of them) with their neighbourhoods; at the end the exact threshold is known, and the upsampled
pixels above it are computed only in the bilinear cells that have a corner above it (a bilinear value never
exceeds its largest corner). Each label is then checked by cause (:func:`causal_check`): the concept removed from
the unit's strongest images against as much of their surroundings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .analyses import LAYERS_HELP, SPLIT_HELP, Analysis, existing, json_check, register
from .data.base import ImageSet
from .data.folder import centre_square
from .errors import ConvscopeError, check_int
from .forward import eval_mode, run_to_all
from .layers import site
from .layout import Layout
from .panels import Line, Panel, Picture, Table, UnitBadge
from .tables import TextTable

QUANTILE = 0.005
IOU = 0.04
COMBINATIONS = 1 << 20  # concepts' label combinations counted before renumbering to those that occur
DENSE_COUNTS = 1 << 24  # (units x combinations) counted densely; past it, only the pairs that occur


@dataclass(frozen=True)
class ConceptSet:
    """Concepts and their pixel masks over a set of images, as label maps: ``maps`` (N, L, H, W) uint8, where
    label ``k > 0`` of map ``j`` is concept ``lookup[j][k]`` (0: none). One map per category holds the
    embedded set's concepts (a pixel has one part, one colour ...); masks that overlap take a map each."""

    names: tuple[str, ...]
    categories: tuple[str, ...]
    maps: torch.Tensor
    lookup: tuple[torch.Tensor, ...]
    annotated: torch.Tensor | None = None  # (N, categories) bool: the category is labelled there [where it has pixels]
    # image i drawn again without concept c, (3, H, W) uint8, or None where it cannot be (then its pixels are painted)
    without: Callable[[int, int], torch.Tensor | None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.maps.dtype != torch.uint8 or self.maps.dim() != 4 or self.maps.shape[1] != len(self.lookup):
            raise ValueError(f"maps must be uint8 (N, {len(self.lookup)}, H, W), got {self.maps.dtype} "
                             f"{tuple(self.maps.shape)}")

    @property
    def category_names(self) -> list[str]:
        return list(dict.fromkeys(self.categories))

    def concept_category(self) -> torch.Tensor:
        """Each concept's category, as an index of :attr:`category_names`."""
        order = self.category_names
        return torch.tensor([order.index(c) for c in self.categories], dtype=torch.long)


CATEGORY_FILE = "categories.json"


def _binary_mask(path: Path, image: Path, size: int) -> torch.Tensor:
    """One mask file read as its image is (short side scaled to ``size``, centre crop), by nearest neighbour, as
    (size, size) bool; a mask of another size than its image, or with grey levels, is refused."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mask = im.convert("L")
        with Image.open(image) as im:
            image_size = im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise ConvscopeError(f"mask {path} is not a readable image ({type(e).__name__}: {e})") from None
    if mask.size != image_size:
        raise ConvscopeError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image} is "
                             f"{image_size[0]}x{image_size[1]}: a mask has its image's size")
    levels = {v for v, count in enumerate(mask.histogram()) if count}
    if not levels <= {0, 255} and not levels <= {0, 1}:
        grey = sorted(levels - {0, 1, 255})
        raise ConvscopeError(f"mask {path} is not binary: it has grey values ({', '.join(map(str, grey[:4]))}"
                             f"{', ...' if len(grey) > 4 else ''}); a mask is black (0) where the concept is not and "
                             "white (255, or 1) where it is")
    mask = mask.resize((size, size), Image.Resampling.NEAREST, box=centre_square(*mask.size))
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(size, size) > 0


def user_concepts(data, every, root: str | Path, folder: str | Path) -> ConceptSet:
    """Your own concepts' masks for an image folder: ``folder/<concept>/<image>.png``, where ``<image>`` is the
    image's path under the data's ``root`` (``car/001.png`` for ``root/car/001.jpg``), white where the concept is;
    an image without a concept's file has none of it. ``folder/categories.json`` may name each concept's category
    (``{"wheel": "part", "red": "colour"}``; others: ``concept``); a category counts as labelled in an image that
    has a file of any of its concepts. Every mask of the folder must belong to an image of the data set (``every``:
    all of it; ``data`` the images dissected), have its image's size, be black and white, and every concept must
    have pixels; anything else is refused, naming the file."""
    import json

    folder, root = Path(folder), Path(root)
    if not folder.is_dir():
        raise ConvscopeError(f"--masks {str(folder)!r} is not a folder; it holds <concept>/<image>.png masks")
    sources = getattr(data, "sources", None)
    if not sources:
        raise ConvscopeError(f"--masks names files by the images' own paths; data {data.name!r} has no image files")
    concepts = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not concepts:
        raise ConvscopeError(f"--masks {str(folder)!r} has no concept folders: <concept>/<image>.png, white where "
                             "the concept is")
    categories: dict = {}
    if (folder / CATEGORY_FILE).is_file():
        try:
            categories = json.loads((folder / CATEGORY_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConvscopeError(f"{folder / CATEGORY_FILE} is not JSON ({e})") from None
        if not isinstance(categories, dict) or not all(isinstance(v, str) for v in categories.values()):
            raise ConvscopeError(f"{folder / CATEGORY_FILE} must map each concept to its category's name, "
                                 '{"wheel": "part", ...}')
        unknown_names = sorted(set(categories) - set(concepts))
        if unknown_names:
            raise ConvscopeError(f"{folder / CATEGORY_FILE} names concepts with no folder: {', '.join(unknown_names)}")
    rel = [Path(p).relative_to(root).with_suffix(".png").as_posix() for p in sources]
    known = {Path(p).relative_to(root).with_suffix(".png").as_posix() for p in every.sources}
    size = data.image_size
    maps = torch.zeros(len(sources), len(concepts), size, size, dtype=torch.uint8)
    cats = [categories.get(c, "concept") for c in concepts]
    order = list(dict.fromkeys(cats))
    annotated = torch.zeros(len(sources), len(order), dtype=torch.bool)
    where = {r: i for i, r in enumerate(rel)}
    for j, concept in enumerate(concepts):
        files = sorted(p.relative_to(folder / concept).as_posix() for p in (folder / concept).rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        stray = [f for f in files if f not in known]
        if stray:
            raise ConvscopeError(f"--masks: {len(stray)} mask(s) of {concept!r} belong to no image of the data set, "
                                 f"such as {concept}/{stray[0]} (a mask is <concept>/<image path under the data "
                                 "root, .png>)")
        for f in files:
            i = where.get(f)
            if i is None:  # an image of the data set, not of the split dissected
                continue
            maps[i, j] = _binary_mask(folder / concept / f, Path(sources[i]), size)
            annotated[i, order.index(cats[j])] = True
        if not maps[:, j].any() and files:
            raise ConvscopeError(f"--masks: concept {concept!r} has no pixels in any of its {len(files)} masks of "
                                 "these images; remove its folder or give its masks")
        if not files:
            raise ConvscopeError(f"--masks: concept folder {concept!r} holds no masks")
    return ConceptSet(tuple(concepts), tuple(cats), maps, tuple(torch.tensor([-1, j]) for j in range(len(concepts))),
                      annotated)


def embedded_concepts(data: ImageSet) -> ConceptSet:
    """The concepts of the embedded data set's images (rendered: see :func:`convscope.data.synthetic.concept_maps`)."""
    from .data.synthetic import CONCEPTS, concept_maps, render_without

    scenes = data.truth.scenes if getattr(data, "truth", None) is not None else None
    if scenes is None:
        raise ConvscopeError(f"dissection needs each image's concept masks; data {data.name!r} has none: use the "
                             "embedded synthetic data, whose concepts are rendered with its images")
    names, categories, lookup = [], [], []
    for category, members in CONCEPTS.items():
        lookup.append(torch.tensor([-1, *range(len(names), len(names) + len(members))], dtype=torch.long))
        names += members
        categories += [category] * len(members)

    def without(i: int, c: int) -> torch.Tensor | None:
        image = render_without(scenes[i].tolist(), data.image_size, categories[c], names[c])
        return None if image is None else torch.from_numpy(image).permute(2, 0, 1)

    return ConceptSet(tuple(names), tuple(categories), concept_maps(scenes, data.image_size), tuple(lookup),
                      without=without)


@dataclass
class LayerDissection:
    """One layer's dissection: per unit its threshold, and per unit and concept the pixels where both are
    (``intersection``), the unit's pixels over the images where the concept's category is annotated
    (``unit_area``, per category), and per concept its pixels (``concept_area``); sums over the data set."""

    thresholds: torch.Tensor
    intersection: torch.Tensor
    unit_area: torch.Tensor
    concept_area: torch.Tensor
    category: torch.Tensor = field(repr=False)
    peaks: torch.Tensor | None = field(default=None, repr=False)  # (images, units): each map's maximum

    @property
    def iou(self) -> torch.Tensor:
        """(units, concepts) intersection over union, float64 (0 where both are empty)."""
        union = self.unit_area[:, self.category] + self.concept_area[None] - self.intersection
        return torch.where(union > 0, self.intersection / union.clamp_min(1), torch.zeros((), dtype=torch.float64))

    def labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each unit's best concept and its IoU."""
        score, label = self.iou.max(1)
        return label, score


def _rank(n: int, quantile: float) -> tuple[int, float]:
    """For the ``1 - quantile`` quantile of ``n`` values by numpy's linear rule: the rank from the top of the value
    below it (0 is the maximum) and the fraction of the way to the value above it."""
    p = (n - 1) * (1 - quantile)
    lo = math.floor(p)
    return n - 1 - lo, p - lo


def _check_quantile(quantile) -> None:
    if not (isinstance(quantile, float | int) and 0 < quantile < 1):
        raise ConvscopeError(f"quantile must be between 0 and 1 (the top share of each unit's activations), got "
                             f"{quantile!r}")


def _check_maps(layer: str, act: torch.Tensor) -> None:
    if act.dim() != 4:
        raise ConvscopeError(f"layer {layer!r} has no feature maps (its output is {tuple(act.shape[1:])}); "
                             "dissection labels the units of convolutional layers")


def _bilinear_table(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output row of a bilinear upsampling from ``n_in`` to ``n_out`` (pixel centres aligned, PyTorch's
    ``align_corners=False``): its cell, named by the source row above it (-1 above the first row's centre, where
    the first row is repeated; ``n_in - 1`` below the last's), and the weight of the source row below it."""
    src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    cell = src.floor().long().clamp(-1, n_in - 1)
    return cell, torch.where((cell >= 0) & (cell < n_in - 1), src - cell, 0.0)


class _Stream:
    """One layer's dissection in one pass over the images: per unit the values above the running top share, each
    with where it is (image, row, column) and its 3x3 neighbourhood (edges repeated: what bilinear upsampling
    reads), and each map's maximum. A value can only leave the top when larger ones arrive, so at the end the
    values above the exact threshold are all here, with all that the upsampled pixels around them need. Once the
    top is full, only the values above its smallest are looked at."""

    def __init__(self, n_images: int, quantile: float):
        self.n_images, self.quantile = n_images, quantile
        self.top = self.where = self.around = None
        self.peaks: list[torch.Tensor] = []

    def add(self, act: torch.Tensor, first: int) -> None:
        b, units, h, w = act.shape
        self.size = (h, w)
        if self.top is None:
            self.rank = _rank(self.n_images * h * w, self.quantile)
            self.top = torch.empty(units, 0)
            self.where = torch.empty(units, 0, 3, dtype=torch.long)
            self.around = torch.empty(units, 0, 9)
        act = act.float().contiguous()
        flat = act.view(-1)
        self.peaks.append(act.amax((2, 3)))
        full, old, hw = self.rank[0] + 1, self.top.shape[1], h * w
        if old == full:  # candidates: the values above each unit's smallest kept, packed per unit (-1: none)
            floor = self.top[:, -1, None]
            rows = act.view(b * units, h, w)  # the rows with a value above the floor, then their values above it
            row = (rows.amax(2) > floor.repeat(b, 1)).view(-1).nonzero().squeeze(1)  # into (b * units * h)
            line, col = (rows.view(-1, w)[row] > floor[row // h % units]).nonzero(as_tuple=True)
            index = row[line] * w + col  # into act's (b, units, h, w)
            unit, order = torch.sort(index // hw % units, stable=True)
            counts = torch.bincount(unit, minlength=units)
            width = int(counts.max()) if len(unit) else 0
            slot = torch.arange(len(unit)) - (counts.cumsum(0) - counts)[unit]
            candidate = torch.full((units * width,), -1, dtype=torch.long)
            candidate[unit * width + slot] = index[order]
            candidate = candidate.view(units, width)
            values = torch.where(candidate >= 0, flat[candidate.clamp_min(0)], -math.inf)
        else:
            candidate, values = None, act.transpose(0, 1).reshape(units, -1)
        top, pick = torch.cat([self.top, values], 1).topk(min(full, old + values.shape[1]), 1)
        unit, k = (pick >= old).nonzero(as_tuple=True)
        j = pick[unit, k] - old
        index = candidate[unit, j] if candidate is not None else ((j // hw) * units + unit) * hw + j % hw
        image, rest = index // (units * hw), index % hw
        row, col = rest // w, rest % w
        offsets = torch.arange(-1, 2)
        rows = (row[:, None] + offsets).clamp(0, h - 1)  # edges repeated
        cols = (col[:, None] + offsets).clamp(0, w - 1)
        around = flat[(((image * units + unit) * h)[:, None] + rows)[:, :, None] * w + cols[:, None, :]].view(-1, 9)
        if old:
            before = pick.clamp_max(old - 1)[..., None]
            where = self.where.gather(1, before.expand(-1, -1, 3))
            neighbours = self.around.gather(1, before.expand(-1, -1, 9))
        else:
            where = torch.empty(*pick.shape, 3, dtype=torch.long)
            neighbours = torch.empty(*pick.shape, 9)
        where[unit, k] = torch.stack([image + first, row, col], 1)
        neighbours[unit, k] = around
        self.top, self.where, self.around = top, where, neighbours

    def threshold(self) -> torch.Tensor:
        r, frac = self.rank
        values = self.top.double()
        return values[:, r] if r == 0 or frac == 0 else values[:, r] + frac * (values[:, r - 1] - values[:, r])

    def pixels(self, limits: torch.Tensor, size: tuple[int, int], budget: int = 1 << 22):
        """The upsampled pixels above each unit's threshold, in chunks of about ``budget`` pixels looked at, as
        bilinear cells ``(image, unit, top, left, on)``: per cell its image, unit and first pixel's row and column,
        and which of the pixels from there pass (cells, rows, cols). Bilinear upsampling cuts the image
        into cells, the pixels between four neighbouring source positions; a pixel can pass only in a cell with a
        corner above the threshold, which is one of the values kept. Each such cell is computed once, by the first
        of its corners above the threshold (in the order bilinear reads them)."""
        h, w = self.size
        (r0, ry), (c0, cx) = _bilinear_table(h, size[0]), _bilinear_table(w, size[1])
        ry, cx = ry.float(), cx.float()
        cells_r, cells_c = torch.arange(-1, h), torch.arange(-1, w)  # cell p's pixels: row_lo[p + 1] ...
        row_lo, row_hi = torch.searchsorted(r0, cells_r), torch.searchsorted(r0, cells_r, right=True)
        col_lo, col_hi = torch.searchsorted(c0, cells_c), torch.searchsorted(c0, cells_c, right=True)
        span_r, span_c = int((row_hi - row_lo).max()), int((col_hi - col_lo).max())
        unit, k = (self.top.double() > limits[:, None]).nonzero(as_tuple=True)
        entry = unit * self.top.shape[1] + k
        chunk = max(1, budget // (4 * span_r * span_c))
        dp, dq = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])  # the four cells with a corner here
        for start in range(0, len(unit), chunk):
            u, e = unit[start:start + chunk], entry[start:start + chunk]
            image, a, c = self.where.view(-1, 3).index_select(0, e).unbind(1)
            around = self.around.view(-1, 9).index_select(0, e)
            above = around > limits[u].float()[:, None]
            p, q = a[:, None] - 1 + dp, c[:, None] - 1 + dq  # (entries, 4): each cell's top-left corner
            top, bottom = p.clamp_min(0) - a[:, None] + 1, (p + 1).clamp_max(h - 1) - a[:, None] + 1
            left, right = q.clamp_min(0) - c[:, None] + 1, (q + 1).clamp_max(w - 1) - c[:, None] + 1
            corners = torch.stack([top * 3 + left, top * 3 + right, bottom * 3 + left, bottom * 3 + right], 2)
            hit = above.gather(1, corners.view(len(u), 16)).view(len(u), 4, 4)
            first = corners.gather(2, hit.byte().argmax(2, keepdim=True))[..., 0]  # the first corner above
            n, cell = (hit.any(2) & (first == 4)).nonzero(as_tuple=True)  # the cells this entry computes
            v, p, q = around[n].gather(1, corners[n, cell]), p[n, cell], q[n, cell]
            ys = row_lo[p + 1][:, None] + torch.arange(span_r)
            xs = col_lo[q + 1][:, None] + torch.arange(span_c)
            # the weights of the pixels past the cell's end are NaN, so that they do not pass
            wy = torch.where(ys < row_hi[p + 1][:, None], ry[ys.clamp_max(size[0] - 1)], math.nan)[:, :, None]
            wx = torch.where(xs < col_hi[q + 1][:, None], cx[xs.clamp_max(size[1] - 1)], math.nan)[:, None, :]
            v = v[:, :, None, None]
            upper = torch.addcmul(v[:, 0], wx, v[:, 1] - v[:, 0])  # along the columns, on the cell's two rows
            lower = torch.addcmul(v[:, 2], wx, v[:, 3] - v[:, 2])
            on = torch.addcmul(upper, wy, lower - upper) > limits[u[n]].float()[:, None, None]
            yield image[n], u[n], ys[:, 0], xs[:, 0], on

    def finish(self, combo: torch.Tensor, member: torch.Tensor, present: torch.Tensor, concept_area: torch.Tensor,
               category: torch.Tensor) -> LayerDissection:
        """The sums of :class:`LayerDissection` from the pixels above the thresholds; ``combo`` and ``member``:
        each pixel's combination of concepts and their concepts (:func:`_combinations`)."""
        limits = self.threshold()
        units, n_combos = self.top.shape[0], len(member)
        n_images = len(combo)
        inter = torch.zeros(units, member.shape[1], dtype=torch.float64)
        fired = torch.zeros(n_images * units, dtype=torch.float64)
        flat, (height, width) = combo.view(-1), combo.shape[1:]
        for image, unit, top, left, on in self.pixels(limits, (height, width)):
            cell, dy, dx = on.nonzero(as_tuple=True)
            fired += torch.bincount((image * units + unit)[cell], minlength=n_images * units)
            if len(cell):
                lo, hi = (int(end) for end in torch.aminmax(unit))
                pixel = ((image * height + top) * width + left)[cell] + dy * width + dx
                key = ((unit - lo) * n_combos)[cell] + flat[pixel]
                if (hi + 1 - lo) * n_combos <= DENSE_COUNTS:
                    counts = torch.bincount(key, minlength=(hi + 1 - lo) * n_combos).view(hi + 1 - lo, n_combos)
                    inter[lo:hi + 1] += counts.double() @ member
                else:  # many combinations of your concepts: count only those that occur
                    key, counts = torch.unique(key, return_counts=True)
                    inter.index_add_(0, lo + key // n_combos, counts.double()[:, None] * member[key % n_combos])
        area = fired.view(n_images, units).T @ present  # a unit's pixels where each category is annotated
        return LayerDissection(limits, inter, area, concept_area.clone(), category, torch.cat(self.peaks))


def _combinations(concepts: ConceptSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's labels (one per map) as one number: the index of its combination among those that occur,
    (N, H, W) int32; and the concepts of each combination, (combinations, concepts) float64 of 0 and 1. The maps
    are combined one at a time, renumbered to the combinations that occur before their count could pass
    :data:`COMBINATIONS`; so a pixel's concepts are looked up once, however many maps there are."""
    maps = concepts.maps
    combo = torch.zeros(maps.shape[0], *maps.shape[2:], dtype=torch.int32)
    table = torch.zeros(1, 0, dtype=torch.long)  # each combination's label in every map so far

    def occurring(combo, table):
        seen = torch.bincount(combo.view(-1), minlength=len(table)) > 0
        return (seen.cumsum(0, dtype=torch.int32) - 1)[combo], table[seen]

    for j, lookup in enumerate(concepts.lookup):
        n = len(lookup)
        if len(table) * n > COMBINATIONS:
            combo, table = occurring(combo, table)
        combo = combo * n + maps[:, j]
        table = torch.cat([table.repeat_interleave(n, 0), torch.arange(n).repeat(len(table))[:, None]], 1)
    combo, table = occurring(combo, table)
    member = torch.zeros(len(table), len(concepts.names), dtype=torch.float64)
    for j, lookup in enumerate(concepts.lookup):
        concept = lookup[table[:, j]]
        hit = (concept >= 0).nonzero().flatten()
        member[hit, concept[hit]] = 1
    return combo, member


def _concept_totals(combo: torch.Tensor, member: torch.Tensor, concepts: ConceptSet, batch: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each concept's pixels over the images, and per image which categories are annotated there (those of a
    concept with pixels, or as ``concepts.annotated`` says); ``combo`` and ``member`` from :func:`_combinations`."""
    n_combos = len(member)
    area = torch.bincount(combo.view(-1), minlength=n_combos).double() @ member
    if concepts.annotated is not None:
        return area, concepts.annotated.double()
    in_category = member @ F.one_hot(concepts.concept_category(), len(concepts.category_names)).double()
    present = torch.zeros(len(combo), in_category.shape[1], dtype=torch.float64)
    for start in range(0, len(combo), batch):
        part = combo[start:start + batch].flatten(1).long()
        key = torch.arange(len(part))[:, None] * n_combos + part
        counts = torch.bincount(key.view(-1), minlength=len(part) * n_combos).view(len(part), n_combos)
        present[start:start + len(part)] = (((counts > 0).double() @ in_category) > 0).double()
    return area, present


def dissect(model: nn.Module, layers: list[str], data: ImageSet, concepts: ConceptSet, quantile: float = QUANTILE,
            batch_size: int = 64, progress: bool | None = None) -> dict[str, LayerDissection]:
    """The units of ``layers`` dissected in one forward pass over ``data`` (whose images ``concepts`` describe, in
    order): thresholds, then the upsampled pixels above them, only where values above them are (:class:`_Stream`)."""
    if len(concepts.maps) != len(data):
        raise ConvscopeError(f"{len(concepts.maps)} concept maps for {len(data)} images: give one per image")
    _check_quantile(quantile)
    sites = [site(model, layer) for layer in layers]
    streams = {layer: _Stream(len(data), quantile) for layer in layers}
    bar = tqdm(total=len(data), desc="dissect", unit="image", disable=None if progress is None else not progress)
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(data), batch_size):
            x = data.batch(torch.arange(start, min(start + batch_size, len(data))))[0]
            for layer, act in zip(layers, run_to_all(model, sites, x)):
                _check_maps(layer, act)
                streams[layer].add(act, start)
            bar.update(len(x))
    bar.close()
    combo, member = _combinations(concepts)
    concept_area, present = _concept_totals(combo, member, concepts)
    category = concepts.concept_category()
    return {layer: stream.finish(combo, member, present, concept_area, category)
            for layer, stream in streams.items()}


# ----------------------------------------------------------------------------------------------- by cause

CAUSAL_P = 0.01
CAUSAL_IMAGES = 30


def concept_masks(concepts: ConceptSet, concept: int, index: torch.Tensor) -> torch.Tensor:
    """Concept ``concept``'s pixels in images ``index``, (n, H, W) bool."""
    out = torch.zeros(len(index), *concepts.maps.shape[-2:], dtype=torch.bool)
    for j, lookup in enumerate(concepts.lookup):
        labels = (lookup == concept).nonzero().flatten()
        if len(labels):
            out |= torch.isin(concepts.maps[index, j].long(), labels)
    return out


def elsewhere(mask: torch.Tensor, near: tuple[float, float], generator: torch.Generator) -> torch.Tensor | None:
    """The same shape as ``mask`` (H, W), moved to where it covers none of it and stays in the image, as close to
    ``near`` (row, column: where the unit fires) as that allows, on a 2-pixel grid (ties drawn at random); None
    where there is no such place. Near the unit, the control covers what the unit sees as much as it can: a label
    passes only where its own pixels matter more than their surroundings, not merely where they lie on the
    object and the control on the background."""
    ys, xs = mask.nonzero(as_tuple=True)
    if len(ys) == 0:
        return None
    h, w = mask.shape
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    dy = torch.arange(-y0, h - y1, 2)
    dx = torch.arange(-x0, w - x1, 2)
    shifts = torch.cartesian_prod(dy, dx)
    shifts = shifts[(shifts != 0).any(1)]
    cy, cx = float(ys.float().mean()), float(xs.float().mean())
    distance = (shifts[:, 0] + cy - near[0]) ** 2 + (shifts[:, 1] + cx - near[1]) ** 2
    order = torch.argsort(distance + torch.rand(len(shifts), generator=generator) * 1e-3)
    for k in order.tolist():
        sy, sx = int(shifts[k, 0]), int(shifts[k, 1])
        moved = torch.zeros_like(mask)
        moved[ys + sy, xs + sx] = True
        if not (moved & mask).any():
            return moved
    return None


@dataclass(frozen=True)
class Causal:
    """Removing a unit's concept from images against removing the same shape elsewhere, paired over images: the
    activation drops, how many pairs the concept's removal dropped more (``wins`` of ``pairs`` that differ), the
    one-sided sign test's p, and the verdict (p < 0.01)."""

    concept: str
    drop: float
    drop_elsewhere: float
    wins: int
    pairs: int
    p: float

    @property
    def causal(self) -> bool:
        return self.p < CAUSAL_P

    def to_dict(self) -> dict:
        return {"concept": self.concept, "drop": self.drop, "drop_elsewhere": self.drop_elsewhere, "wins": self.wins,
                "pairs": self.pairs, "p": self.p, "causal": self.causal}


def causal_check(model: nn.Module, layer: str, unit: int, concept: int, data: ImageSet, concepts: ConceptSet,
                 peaks: torch.Tensor, fill: torch.Tensor, n_images: int = CAUSAL_IMAGES, seed: int = 0) -> Causal:
    """Remove concept ``concept`` from those of the ``n_images`` images where the unit fires most (``peaks``: its
    map's maximum per image) that hold the concept: drawn again without it where the data can be (the embedded
    set's objects, parts and shapes: everything else unchanged), else its pixels painted with ``fill`` (the data's
    mean colour); and, in each, the same shape painted elsewhere, as near the unit's strongest position as it goes
    without covering the concept (:func:`elsewhere`); the unit's drop (its map's maximum) under each, paired, and
    the sign test: does removing the concept lower the unit more than removing as much of what surrounds it?"""
    from scipy import stats

    top = peaks[:, unit].argsort(descending=True)[:n_images]
    index = top[concept_masks(concepts, concept, top).flatten(1).any(1)]
    if len(index) == 0:
        return Causal(concepts.names[concept], 0.0, 0.0, 0, 0, 1.0)
    generator = torch.Generator().manual_seed(seed)
    probe = site(model, layer)
    with torch.no_grad(), eval_mode(model):
        x = data.batch(index)[0]
        maps = run_to_all(model, [probe], x)[0][:, unit]
        h, w = maps.shape[-2:]
        peak = maps.flatten(1).argmax(1)
        size = x.shape[-2:]
        near = [(((int(p) // w) + 0.5) * size[0] / h, ((int(p) % w) + 0.5) * size[1] / w) for p in peak]
        masks = concept_masks(concepts, concept, index)
        pairs = [(k, m, moved) for k, (m, at) in enumerate(zip(masks, near))
                 if (moved := elsewhere(m, at, generator)) is not None]
        if not pairs:
            return Causal(concepts.names[concept], 0.0, 0.0, 0, 0, 1.0)
        keep = torch.tensor([k for k, _, _ in pairs])
        x = x[keep]
        here = torch.stack([m for _, m, _ in pairs])[:, None].to(x.dtype)
        there = torch.stack([m for _, _, m in pairs])[:, None].to(x.dtype)
        f = fill.to(x)[None, :, None, None]
        removed = x * (1 - here) + f * here
        if concepts.without is not None:  # drawn again without it, where the data can be (the embedded set's)
            for j, k in enumerate(keep.tolist()):
                drawn = concepts.without(int(index[k]), concept)
                if drawn is not None:
                    removed[j] = drawn.to(x) / 255
        painted = torch.cat([removed, x * (1 - there) + f * there])
        act = run_to_all(model, [probe], painted)[0][:, unit].amax((1, 2)).double()
    n = len(pairs)
    original = maps[keep].amax((1, 2)).double()
    drop, drop_elsewhere = original - act[:n], original - act[n:]
    wins, ties = int((drop > drop_elsewhere).sum()), int((drop == drop_elsewhere).sum())
    differ = n - ties
    p = float(stats.binomtest(wins, differ, 0.5, alternative="greater").pvalue) if differ else 1.0
    return Causal(concepts.names[concept], float(drop.mean()), float(drop_elsewhere.mean()), wins, differ, p)


# ----------------------------------------------------------------------------------------------- the analysis


@dataclass
class DissectResult:
    """A run's dissection: per layer the sums (:class:`LayerDissection`), the concepts, and the settings."""

    layers: dict[str, LayerDissection]
    names: tuple[str, ...]
    categories: tuple[str, ...]
    quantile: float
    iou: float
    split: str
    n_images: int
    causal: dict[str, dict[int, Causal]] = field(default_factory=dict)  # each labelled unit's label, by cause
    control: dict[str, dict[int, Causal]] = field(default_factory=dict)  # the same test of a random concept
    top9: dict[str, dict[int, float]] = field(default_factory=dict)  # share of its top-9 fields holding its label
    pictures: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict, repr=False)  # see label_views

    def units(self, layer: str, runners: int = 3) -> list[dict]:
        """Per unit of ``layer``: its label (None under the IoU bar), category, IoU, the runner-up concepts."""
        d = self.layers[layer]
        iou = d.iou
        order = iou.argsort(1, descending=True)[:, :runners + 1]
        out = []
        for u in range(iou.shape[0]):
            best = int(order[u, 0])
            score = float(iou[u, best])
            causal, control = self.causal.get(layer, {}).get(u), self.control.get(layer, {}).get(u)
            out.append({"unit": u, "label": self.names[best] if score > self.iou else None,
                        "category": self.categories[best] if score > self.iou else None, "iou": score,
                        "best": self.names[best], "threshold": float(d.thresholds[u]),
                        "runners_up": [{"concept": self.names[int(c)], "category": self.categories[int(c)],
                                        "iou": float(iou[u, c])} for c in order[u, 1:]],
                        "causal": causal.to_dict() if causal else None,
                        "control": control.to_dict() if control else None,
                        "top9_share": self.top9.get(layer, {}).get(u)})
        return out

    def summary(self, layer: str) -> dict:
        """Per layer: units, labelled units, and distinct concepts labelled, per category (NetDissect's figure)."""
        units = self.units(layer, 0)
        labelled = [u for u in units if u["label"] is not None]
        distinct = {c: len({u["label"] for u in labelled if u["category"] == c})
                    for c in dict.fromkeys(self.categories)}
        detectors = {c: sum(u["category"] == c for u in labelled) for c in dict.fromkeys(self.categories)}
        checked = self.causal.get(layer, {})
        controls = self.control.get(layer, {})
        shares = list(self.top9.get(layer, {}).values())
        return {"units": len(units), "labelled": len(labelled), "distinct": distinct, "detectors": detectors,
                "causal": sum(c.causal for c in checked.values()), "checked": len(checked),
                "control_causal": sum(c.causal for c in controls.values()), "control_checked": len(controls),
                "top9_share": sum(shares) / len(shares) if shares else None}


def compute(run, layers: list[str] | None = None, split: str | None = None, quantile: float = QUANTILE,
            iou: float = IOU, n: int | None = None, masks: str | None = None, causal: bool = True, seed: int = 0,
            batch_size: int = 64, progress: bool | None = None) -> DissectResult:
    """Dissect the units of ``layers`` (default: conv1..conv5, or the model's stages) over the first ``n`` images
    of ``split`` (default: all of it), against the embedded data's rendered concepts or your masks (``masks``: a
    folder, :func:`user_concepts`)."""
    if n is not None:
        check_int(n, "n", 1, 10**9)
    check_int(batch_size, "batch_size", 1, 65536)
    if not (isinstance(iou, float | int) and 0 <= iou < 1):
        raise ConvscopeError(f"iou must be from 0 to 1 (the IoU a label needs), got {iou!r}")
    _check_quantile(quantile)
    layers = run.check_layers(list(layers)) if layers is not None else run.map_layers()
    split = split or run.default_split("val")
    data = run.split(split)
    if n is not None and n < len(data):
        data = data.subset(torch.arange(n))
    if masks is not None:
        root = getattr(run.data, "root", None)
        if root is None:
            raise ConvscopeError("--masks names masks by the images' paths under the data's folder; this run's data "
                                 "has no folder (attach one with --data folder --data-root DIR)")
        concepts = user_concepts(data, run.split("all"), root, masks)
    else:
        concepts = embedded_concepts(data)
    found = dissect(run.model, layers, data, concepts, quantile, batch_size, progress)
    result = DissectResult(found, concepts.names, concepts.categories, quantile, iou, split, len(data))
    label_views(run.model, result, data, concepts)
    if causal:
        check_by_cause(run.model, result, data, concepts, seed, progress)
    return result


def check_by_cause(model: nn.Module, result: DissectResult, data: ImageSet, concepts: ConceptSet, seed: int = 0,
                   progress: bool | None = None) -> None:
    """For every labelled unit: its label by cause (:func:`causal_check`), and the same test of a concept drawn at
    random (the control: it should pass about as often as chance)."""
    from .occluders import default_fill

    fill = default_fill(model, data.batch(torch.arange(min(len(data), 256)))[0])
    generator = torch.Generator().manual_seed(seed)
    labelled = _labelled(result)
    bar = tqdm(total=sum(map(len, labelled.values())), desc="dissect: by cause", unit="unit",
               disable=None if progress is None else not progress)
    for layer, units in labelled.items():
        d = result.layers[layer]
        present = (d.concept_area > 0).nonzero().flatten().tolist()
        result.causal[layer], result.control[layer] = {}, {}
        for unit, concept in units:
            result.causal[layer][unit] = causal_check(model, layer, unit, concept, data, concepts, d.peaks, fill,
                                                      seed=seed)
            others = [c for c in present if c != concept]
            if others:
                other = others[int(torch.randint(len(others), (1,), generator=generator))]
                result.control[layer][unit] = causal_check(model, layer, unit, other, data, concepts, d.peaks, fill,
                                                           seed=seed)
            bar.update(1)
    bar.close()


def _labelled(result: DissectResult) -> dict[str, list[tuple[int, int]]]:
    return {layer: [(u["unit"], result.names.index(u["label"])) for u in result.units(layer, 0) if u["label"]]
            for layer in result.layers}


SHOWN = 5  # a labelled unit's strongest images in its picture


def label_views(model: nn.Module, result: DissectResult, data: ImageSet, concepts: ConceptSet) -> None:
    """For every labelled unit: the share of its top-9 receptive fields (its strongest images, at its strongest
    position) that hold its label's pixels (Fig. 2 tied to the label), and its picture: its ``SHOWN`` strongest
    images, dimmed where it does not fire (its maps above its threshold, upsampled), its label's pixels outlined."""
    from .receptive_field import receptive_field

    for layer, units in _labelled(result).items():
        d = result.layers[layer]
        result.top9[layer], result.pictures[layer] = {}, {}
        tops, where = [], []
        for unit, concept in units:
            top = d.peaks[:, unit].argsort(descending=True)[:9]
            x = data.batch(top)[0]
            with torch.no_grad(), eval_mode(model):
                maps = run_to_all(model, [site(model, layer)], x)[0][:, unit]
            flat = maps.flatten(1).argmax(1)
            tops.append((unit, concept, top, len(where)))
            where += [(int(f) // maps.shape[-1], int(f) % maps.shape[-1]) for f in flat]
            fires = F.interpolate(maps[:SHOWN, None].float(), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0] > float(d.thresholds[unit])
            result.pictures[layer][unit] = _picture(x[:SHOWN], fires, concept_masks(concepts, concept, top[:SHOWN]))
        if tops:
            boxes = receptive_field(model, layer, where, data.image_size)
            for unit, concept, top, first in tops:
                masks = concept_masks(concepts, concept, top)
                held = [bool(m[b.slices].any()) for m, b in zip(masks, boxes[first:first + len(top)])]
                result.top9[layer][unit] = sum(held) / len(held)


def _picture(x: torch.Tensor, fires: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Images (n, 3, H, W) in [0, 1] side by side, at least 128 px high: dimmed where ``fires`` is false, the
    outline of ``label`` in yellow. (H', n W', 3) uint8."""
    scale = max(1, -(-128 // x.shape[-1]))
    up = (lambda t: t.repeat_interleave(scale, -1).repeat_interleave(scale, -2))  # noqa: E731
    x, fires, label = up(x), up(fires), up(label).float()
    edge = label - (-F.max_pool2d(-label[:, None], 3, 1, 1))[:, 0]  # the label's pixels next to others
    shown = x * torch.where(fires, 1.0, 0.35)[:, None]
    shown = torch.where(edge[:, None] > 0, torch.tensor([1.0, 0.86, 0.0])[None, :, None, None], shown)
    tiles = [t for i in range(len(shown)) for t in (shown[i], torch.ones(3, shown.shape[-2], 2))]
    return (torch.cat(tiles[:-1], -1).permute(1, 2, 0) * 255).round().to(torch.uint8)


def findings(result: DissectResult) -> list:
    """The claim dissection's labels make, tested on this model: a label holds by cause more often than a random
    concept does (paired over the labelled units: 1 where the sign test passes)."""
    from .findings import finding, paired_contrast

    pairs = [(c.causal, result.control[layer][u].causal) for layer, checked in result.causal.items()
             for u, c in checked.items() if u in result.control.get(layer, {})]
    if len(pairs) < 2:
        return []
    labels, controls = zip(*pairs)
    contrast = paired_contrast([float(v) for v in labels], [float(v) for v in controls], "labelled units")
    return [finding(
        "dissect.causal", "a unit's concept label holds by cause: painting the concept out lowers the unit more than "
        "painting as much of its surroundings, more often than for a random concept",
        "Bau et al. 2017 (network dissection), checked by intervention", "dissect", contrast,
        "share of labels that pass the sign test - share of random concepts that pass it, over labelled units",
        "not measured by NetDissect (its labels are not checked by cause)",
        f"{100 * sum(labels) / len(labels):.0f}% of {len(labels)} labels causal vs "
        f"{100 * sum(controls) / len(labels):.0f}% of random concepts")]


def dissect_table(result: DissectResult) -> str:
    """Per layer: labelled units, and distinct concepts per category (NetDissect's count of unique detectors)."""
    cats = list(dict.fromkeys(result.categories))
    rows = []
    checked = bool(result.causal)
    for layer in result.layers:
        s = result.summary(layer)
        share = (lambda a, b: f"{a} of {b}" if b else "-")  # noqa: E731
        rows.append((layer, str(s["units"]), f"{s['labelled']} ({100 * s['labelled'] / max(s['units'], 1):.0f}%)",
                     *(str(s["distinct"][c]) for c in cats),
                     *((share(s["causal"], s["checked"]), share(s["control_causal"], s["control_checked"]),
                        "-" if s["top9_share"] is None else f"{100 * s['top9_share']:.0f}%") if checked else ())))
    by_cause = ("causal labels", "causal: random concept", "top-9 fields holding the label") if checked else ()
    note = (f"{result.n_images} images of the {result.split} split; a unit is labelled with the concept of highest "
            f"IoU when it exceeds {result.iou} (its maps above their top {100 * result.quantile:g}% quantile, "
            "upsampled to the image).")
    if checked:
        note += (f" Causal: painting the label's pixels out (the data's mean colour) lowers the unit's maximum more "
                 f"than painting the same shape elsewhere, in the {CAUSAL_IMAGES} images where it fires most (sign "
                 f"test, p < {CAUSAL_P}); the control gives each unit a random concept instead.")
    note += " NetDissect, ResNet-50 layer4 on Broden: 1,355 of 2,048 units (66%) labelled, 186 distinct concepts."
    return TextTable(("layer", "units", "labelled", *(f"distinct {c}" for c in cats), *by_cause), tuple(rows),
                     note).markdown()


def dissect_figure(result: DissectResult):
    """NetDissect's figure: per layer, the distinct concepts detected in each category, and the labelled share."""
    from matplotlib.figure import Figure

    cats = list(dict.fromkeys(result.categories))
    layers = list(result.layers)
    summaries = [result.summary(layer) for layer in layers]  # each a pass over the layer's units: once
    fig = Figure(figsize=(max(5.0, 1.3 * len(layers) + 2), 3.4))
    ax = fig.subplots()
    width = 0.8 / len(cats)
    for k, c in enumerate(cats):
        ax.bar([i + (k - (len(cats) - 1) / 2) * width for i in range(len(layers))],
               [s["distinct"][c] for s in summaries], width, label=c)
    ax.set_xticks(range(len(layers)), layers)
    ax.set(ylabel="distinct concepts labelled", title="Network dissection: concepts per layer")
    share = ax.twinx()
    share.plot(range(len(layers)), [100 * s["labelled"] / max(s["units"], 1) for s in summaries], "k.-",
               label="labelled units (%)")
    share.set(ylabel="labelled units (%)", ylim=(0, 100))
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    share.legend(frameon=False, fontsize=8, loc="upper right")
    ax.spines[["top"]].set_visible(False)
    fig.tight_layout()
    return fig


def write_dissect(result: DissectResult, layout: Layout) -> list[Path]:
    """``dissect.json`` (per layer: the summary and every unit's label, IoU, threshold, runner-ups and checks),
    ``dissect.md`` (the table), ``dissect.png`` (the figure) and each labelled unit's picture in the run's figures,
    replacing an earlier dissection's."""
    numbers = {"method": "network dissection (Bau et al. 2017)", "quantile": result.quantile, "iou": result.iou,
               "split": result.split, "n_images": result.n_images,
               "concepts": [{"name": n, "category": c} for n, c in zip(result.names, result.categories)],
               "layers": {layer: {"summary": result.summary(layer), "units": result.units(layer)}
                          for layer in result.layers}}
    for units in layout.unit_files(layout.dissected).values():  # an earlier dissection's, replaced by this one
        for path in units.values():
            artifacts.remove(path)
    pictures = [artifacts.save_image(layout.dissected_unit(layer, unit), picture.numpy())
                for layer, units in result.pictures.items() for unit, picture in units.items()]
    return [*pictures, artifacts.write_json(layout.figure("dissect", ".json"), numbers),
            artifacts.write_text(layout.figure("dissect", ".md"), dissect_table(result)),
            artifacts.save_figure(layout.figure("dissect"), dissect_figure(result), dpi=110)]


# ----------------------------------------------------------------------------------------------- compared


def compare_models(models: dict[str, nn.Module], layers: list[str], data: ImageSet, quantile: float = QUANTILE,
                   iou: float = IOU, progress: bool | None = None) -> dict[str, dict[str, dict]]:
    """Several models dissected over the same images (the embedded data's concepts): name -> layer -> the summary
    of :meth:`DissectResult.summary` (no check by cause). The demo's comparisons: its training epochs (how
    detectors appear, as NetDissect showed), ZF against AlexNet, with and without renormalisation."""
    concepts = embedded_concepts(data)
    out = {}
    for name, model in models.items():
        found = dissect(model, layers, data, concepts, quantile, progress=progress)
        result = DissectResult(found, concepts.names, concepts.categories, quantile, iou, "", len(data))
        out[name] = {layer: result.summary(layer) for layer in layers}
    return out


def comparison_table(compared: dict[str, dict[str, dict]], n_images: int) -> str:
    """One row per model and layer: labelled units, and the detectors of each category."""
    cats = list(next(iter(next(iter(compared.values())).values()))["detectors"])
    rows = tuple((name, layer, f"{s['labelled']} of {s['units']}", *(str(s["detectors"][c]) for c in cats))
                 for name, layers in compared.items() for layer, s in layers.items())
    return TextTable(("model", "layer", "labelled units", *(f"{c} detectors" for c in cats)), rows,
                     f"{n_images} validation images; the same dissection for every model (labels above IoU "
                     f"{IOU}), not checked by cause.").markdown()


def comparison_figure(compared: dict[str, dict[str, dict]]):
    """Left: object and part detectors per layer over the training epochs (the models named ``epoch N``);
    right: labelled units per layer of every model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4))
    left, right = fig.subplots(1, 2)
    epochs = {int(name.rsplit(" ", 1)[1]): v for name, v in compared.items() if name.rsplit(" ", 1)[0] == "epoch"
              and name.rsplit(" ", 1)[1].isdigit()}
    layers = list(next(iter(compared.values())))
    for layer in layers:
        if epochs:
            xs = sorted(epochs)
            left.plot(xs, [epochs[e][layer]["detectors"]["object"] + epochs[e][layer]["detectors"]["part"]
                           for e in xs], ".-", label=layer)
        right.plot(range(len(compared)), [v[layer]["labelled"] for v in compared.values()], ".-", label=layer)
    left.set(xlabel="epoch", ylabel="object and part detectors", title="detectors during training")
    left.legend(frameon=False, fontsize=8)
    right.set_xticks(range(len(compared)), list(compared), rotation=30, ha="right", fontsize=8)
    right.set(ylabel="labelled units", title="labelled units per model")
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def write_comparison(compared: dict[str, dict[str, dict]], n_images: int, layout: Layout) -> list[Path]:
    """``dissect_compare.json``, ``.md`` and ``.png`` in the run's figures (shown in its dissection section)."""
    models = [{"name": name, "layers": layers} for name, layers in compared.items()]  # in order: JSON sorts keys
    return [artifacts.write_json(layout.figure("dissect_compare", ".json"), {"n_images": n_images, "models": models}),
            artifacts.write_text(layout.figure("dissect_compare", ".md"), comparison_table(compared, n_images)),
            artifacts.save_figure(layout.figure("dissect_compare"), comparison_figure(compared), dpi=110)]


# ----------------------------------------------------------------------------------------------- shown


_read: dict[Path, tuple[int, dict]] = {}


def read_dissection(layout: Layout) -> dict | None:
    """The run's dissection record (read again only when its file changes); None where there is none or it is
    damaged."""
    path = layout.figure("dissect", ".json")
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    if path not in _read or _read[path][0] != stamp:
        record = artifacts.read_json(path)
        if not _record_ok(record):
            return None
        _read.clear()
        _read[path] = (stamp, record)
    return _read[path][1]


def _record_ok(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("layers"), dict)
            and all(isinstance(v, dict) and isinstance(v.get("units"), list) for v in record["layers"].values()))


def _unit(layout: Layout, layer: str, unit: int) -> dict | None:
    record = read_dissection(layout)
    units = record["layers"].get(layer, {}).get("units", []) if record else []
    return units[unit] if 0 <= unit < len(units) and isinstance(units[unit], dict) else None


def _verdict(entry: dict) -> str:
    causal = entry.get("causal")
    if not causal:
        return "not checked by cause"
    if causal["causal"]:
        return (f"causal: painting it out lowered the unit more than painting its surroundings in {causal['wins']} "
                f"of {causal['pairs']} images (sign test p = {causal['p']:.2g})")
    return (f"NOT causal: painting it out lowered the unit more than painting its surroundings in only "
            f"{causal['wins']} of {causal['pairs']} images (sign test p = {causal['p']:.2g})")


def unit_panel(layout: Layout, layer: str, unit: int, _query) -> Panel | None:
    """A unit page's dissection: its label with its IoU and the check by cause, its strongest images with the
    label outlined, the runner-up concepts."""
    entry = _unit(layout, layer, unit)
    if entry is None:
        return None
    if not entry.get("label"):
        return Panel([Line(f"No concept label: its best concept, {entry.get('best')}, overlaps it with IoU "
                           f"{entry.get('iou', 0):.3f}, under the bar of {read_dissection(layout).get('iou')}; see ",
                           ".", "dissect", "the dissection", id="dissect-label")])
    items: list = [Line(f"Detects {entry['label']} ({entry['category']}), IoU {entry['iou']:.3f}; "
                        f"{_verdict(entry)}. See ", ".", "dissect", "the dissection", id="dissect-label")]
    picture = layout.dissected_unit(layer, unit)
    if picture.is_file():
        items.append(Picture(picture, f"{layer} unit {unit}: its strongest images with {entry['label']} outlined",
                             "Dissection.", f"Its {SHOWN} strongest images, dimmed where it does not fire, "
                             f"{entry['label']} outlined in yellow" + (
                                 f"; {100 * entry['top9_share']:.0f}% of its top-9 receptive fields hold "
                                 f"{entry['label']}." if entry.get("top9_share") is not None else "."),
                             id="dissect-picture"))
    runners = entry.get("runners_up") or []
    if runners:
        items.append(Table((("concept", tuple(r["concept"] for r in runners)),
                            ("category", tuple(r["category"] for r in runners)),
                            ("IoU", tuple(f"{r['iou']:.3f}" for r in runners))), id="dissect-runners"))
    return Panel(items)


def units(layout: Layout) -> dict[str, dict[int, Path]]:
    """The labelled units the dissection drew, layer by layer in the order it dissected them."""
    drawn = layout.unit_files(layout.dissected)
    record = read_dissection(layout)
    order = [layer for layer in (record["layers"] if record else []) if layer in drawn]
    return {layer: drawn[layer] for layer in [*order, *(x for x in drawn if x not in order)]}


def unit_badges(layout: Layout, layer: str) -> dict[int, UnitBadge] | None:
    """Each labelled unit's label under its thumbnail (``?`` where it failed the check by cause), sorted by IoU,
    tagged with its concept, its category and its verdict, which the layer page filters by."""
    record = read_dissection(layout)
    if record is None or layer not in record["layers"]:
        return None
    out = {}
    for entry in record["layers"][layer]["units"]:
        if not isinstance(entry, dict) or not entry.get("label"):
            continue
        causal = entry.get("causal")
        verdict = "unchecked" if not causal else "causal" if causal["causal"] else "not causal"
        out[entry["unit"]] = UnitBadge(entry["label"] + ("?" if verdict == "not causal" else ""),
                                       f"{entry['label']} ({entry['category']}), IoU {entry['iou']:.3f}, {verdict}",
                                       float(entry["iou"]), (entry["label"], entry["category"], verdict))
    return out


def check(layout: Layout) -> list[tuple[Path, str]]:
    return json_check(layout.figure("dissect", ".json"), _record_ok)


register(Analysis(
    "dissect", "dissect", "Bau et al. 2017", "What each unit detects: network dissection",
    "Not in the paper: each unit's maps, thresholded at the top 0.5% of its activations over the images and "
    "upsampled to them, against the pixel masks of every concept (object, part, shape, colour, texture; rendered "
    "with the embedded images, not annotated): the intersection over union summed over the images. A unit is "
    "labelled with its best concept where the IoU exceeds 0.04. NetDissect labels 66% of ResNet-50's layer4 "
    "units on Broden.",
    files=lambda layout: (existing(layout.figure("dissect"), layout.figure("dissect_compare")),
                          existing(layout.figure("dissect", ".md"), layout.figure("dissect_compare", ".md"))),
    compute=compute, write=write_dissect, findings=findings, check=check, units=units, unit_panel=unit_panel,
    unit_badges=unit_badges, sort_label="highest IoU first",
    help={"layers": LAYERS_HELP + " [conv1..conv5, or the model's stages]", "split": SPLIT_HELP,
          "quantile": "The top share of each unit's activations that counts as the unit firing.",
          "iou": "The IoU a label needs.", "n": "How many images (the first of the split). [all]",
          "masks": "A folder of your concepts' masks: <concept>/<image path under the data root>.png, white where "
                   "the concept is, and optionally categories.json ({concept: category}). [the embedded data's "
                   "rendered concepts]",
          "causal": "Check each label by cause: paint the concept out of the images where the unit fires most, "
                    "against the same shape painted elsewhere (a sign test, p < 0.01), with a random concept as the "
                    "control.",
          "seed": "Seed of the places painted in the check by cause and of the control's random concepts.",
          "batch_size": "Images per forward pass."},
    summary=dissect_table))


__all__ = ["IOU", "QUANTILE", "ConceptSet", "DissectResult", "LayerDissection", "compute", "dissect",
           "compare_models", "comparison_table", "dissect_table", "embedded_concepts", "findings", "user_concepts",
           "write_comparison"]
