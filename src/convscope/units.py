"""Paper Fig. 2 as an analysis (``convscope scan``): scan a split of the run (resuming an interrupted scan) for
each unit's top-k activations, draw some units of every layer (:mod:`convscope.views`), and write the scan, each
layer's panel and each unit's tile; and the numbers that test the figure's claim (class agreement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import artifacts, distributed, memory, scanned
from .analyses import LAYERS_HELP, RULE_HELP, SPLIT_HELP, Analysis, register
from .deconvnet import RULES, Projector, gradient_note
from .distributed import Group, barrier
from .errors import ConvscopeError, check_int, check_seed, unknown
from .findings import Finding, difference_contrast, finding, mean_contrast
from .imaging import caption
from .layout import Layout
from .topk import TopK, load_topk, save_topk, scan, scan_bytes
from .views import (
    UnitViews,
    batch_for,
    chunk_units,
    layer_grid,
    patch_grid,
    projection_grid,
    select_units,
    thumbnail,
    unit_tile,
    unit_views,
)

if TYPE_CHECKING:
    from .run import Run


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
    chunk: Callable[[str], int] = lambda layer: CHUNK  # units drawn at once in a layer (what memory allows)

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
            max_memory: str | None = None, progress: bool | None = None) -> ScanResult:
    """Fig. 2: scan ``split`` for the top-``k`` of every map of ``layers`` (resuming an interrupted scan from
    the run's scan state), and each map's top ``class_k`` images per class (what a unit is about); the units to
    draw are every unit of each layer (``units`` 0), or a seeded subset of ``units`` per layer, under each of
    the comma-separated ``rule``. An image folder is streamed, not read into memory; the scan's batches, the
    drawing's and the units drawn at once fit ``max_memory`` (:func:`convscope.memory.budget`)."""
    rules = parse_rules(rule)
    check_int(units, "units (0 for all)", 0)
    check_int(class_k, "class-k", 0, 10000)
    check_int(batch_size, "batch-size", 1, 1 << 20)
    check_seed(seed)
    layers = run.check_layers(list(layers)) if layers is not None else run.map_layers()
    split = split or run.default_split("val")
    data = run.split(split, stream=True)
    budget = memory.budget(max_memory, memory.device_of(run.model))  # checked before the scan
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
    per_image = scan_bytes(run.model, layers, (run.image_size, run.image_size))
    batch_size = min(batch_size, batch_for(budget // 2, per_image))
    topk = scan(run.model, data, layers, k=k, batch_size=batch_size, progress=progress, identity=identity,
                class_k=class_k, group=group,
                state_path=run.layout.of_rank(run.layout.scan_state, group.rank, group.world), workers=run.workers)
    chosen = {layer: select_units(topk.values[layer].shape[0], units or None, seed) for layer in layers}

    cache: dict = {}  # each layer's geometry, measured once for all its chunks and rules

    def draw(layer: str, which: torch.Tensor, rule: str) -> UnitViews:
        return unit_views(run.model, data, topk, layer, which, rule=rule, nonlinearities=run.nonlinearities,
                          max_memory=budget, cache=cache)

    def chunk(layer: str) -> int:
        return min(CHUNK, chunk_units(run.model, data, layer, k, budget, cache))

    return ScanResult(topk, split, chosen, rules, run.nonlinearities,
                      {**identity, "layers": layers, "k": k, "rules": rules, "nonlinearities": run.nonlinearities},
                      draw, seed, list(data.classes), group, _labels(data), chunk)


def _labels(data) -> torch.Tensor | None:
    # A lookup, not a pass over the images: the scan's cost stays what it was.
    labels = getattr(data, "labels", None)
    return labels.detach().cpu().long().clone() if isinstance(labels, torch.Tensor) and len(labels) else None


def _drawn(path: Path, identity: dict) -> dict[str, set[int]]:
    """The units a killed write of this same scan had drawn (layer -> units); nothing for another scan's record."""
    state = artifacts.read_json(path)
    try:
        if state.get("identity") == identity:
            return {layer: {int(u) for u in units} for layer, units in state["units"].items()}
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    return {}


def _tile_paths(result: ScanResult, layout: Layout, layer: str, unit: int) -> list[Path]:
    return [*(layout.unit(layer, unit, None if r == result.rule else r) for r in result.rules),
            layout.unit_patches(layer, unit), layout.unit_thumb(layer, unit)]


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
        step = result.chunk(layer) if len(todo) else CHUNK
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            for rule in result.rules:
                views = result.draw(layer, chunk, rule)
                for u, unit in enumerate(chunk.tolist()):
                    artifacts.save_image(layout.unit(layer, unit, None if rule == result.rule else rule),
                                         caption(projection_grid(views, u), note[rule]))
                    if rule == result.rule:
                        artifacts.save_image(layout.unit_patches(layer, unit), patch_grid(views, u))
                        artifacts.save_image(layout.unit_thumb(layer, unit), thumbnail(views, u))
                        if unit in keep.get(layer, ()):
                            kept[layer][unit] = unit_tile(views, u)
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


_opened: dict[Path, tuple[int, Run, dict]] = {}  # run directory -> (its scan's mtime, the run, the geometry cache)


def zoom(layout: Layout, layer: str, unit: int, rank: int, query) -> bytes | None:
    """Projection ``rank`` (1..k) of ``unit`` at the full resolution of its receptive field (at least 128 px a
    side, small fields enlarged pixel by pixel), under the page's ``rule``, computed now from the run's model and
    its scan (PNG); None where the scan has no such unit or rank. A viewer opens each run once."""
    import io

    from PIL import Image

    from .imaging import to_image, upscale
    from .run import open_run

    found = scanned.read_scan(layout)
    if found is None or layer not in found[0].values:
        return None
    topk, info = found[0], found[1]
    if not (0 <= unit < topk.values[layer].shape[0] and 1 <= rank <= topk.k):
        return None
    if topk.images[layer][unit, rank - 1] < 0:  # the scan saw fewer images than k
        return None
    rule = scanned.rule_of(layout, query)
    stamp = layout.topk.stat().st_mtime_ns
    if _opened.get(layout.root, (None,))[0] != stamp:
        _opened[layout.root] = (stamp, open_run(layout.root), {})
    _, run, cache = _opened[layout.root]
    data = run.split(str(info.get("split") or run.default_split("val")), stream=True)
    one = slice(rank - 1, rank)  # that one of the unit's top-k, not all k
    only = TopK(1, {layer: topk.values[layer][:, one]}, {layer: topk.images[layer][:, one]},
                {layer: topk.positions[layer][:, one]}, topk.seen)
    views = unit_views(run.model, data, only, layer, [unit], rule=rule, nonlinearities=run.nonlinearities,
                       cache=cache)
    buffer = io.BytesIO()
    Image.fromarray(upscale(to_image(views.projections[0, 0]), 128)).save(buffer, format="PNG")
    return buffer.getvalue()


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
          "batch_size": "Images per forward pass of the scan, at most (fewer where --max-memory asks; the "
                        "result is the same).",
          "max_memory": "Memory the scan and the drawing may use (4G, 512M); batches and the units drawn at once "
                        "are sized to fit it, the pictures are the same. Default: a quarter of this machine's "
                        "memory, half of the GPU's free memory for a model there.",
          "class_k": "Strongest images kept per map and class (zennit-crp's per-class statistics); a unit's "
                     "class histogram counts the classes of its class-k strongest images. 0 = none.",
          "rule": RULE_HELP + " Several, comma-separated (deconvnet,guided,gradient), draw each unit under "
                          "each; the viewer switches between them."},
    summary=summary, check=_check_scan, units=scanned.units,
    unit_panel=scanned.unit_panel, unit_thumb=scanned.unit_thumb, unit_badges=scanned.unit_badges, unit_zoom=zoom,
    sort_label="most class-specific first"))
