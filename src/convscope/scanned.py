"""A run's scan read back for showing it: its top-k per unit, the rules it drew units under, the classes of each
unit's strongest images, and from them the scan's panel of a unit page, its thumbnails and its badges
(:mod:`convscope.panels`). The record is read again only when its file changes, so a viewer that runs while the
scan writes shows the new one on reload, and a page of a layer of thousands of units reads it once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .errors import ConvscopeError, printable
from .layout import Layout, natural_key
from .panels import Counts, Panel, Picture, Table, UnitBadge, Zoom
from .topk import TopK, class_histogram, load_topk

_cache: dict[Path, tuple[int, TopK, dict, dict]] = {}  # topk file -> (mtime, topk, its metadata, class memo)
_KEPT = 4  # scans kept read at once: a process that opens many runs holds the last few


def read_scan(layout: Layout) -> tuple[TopK, dict, dict] | None:
    """The run's scan (its TopK, its metadata, a memo of per-layer class counts); None if there is none or it is
    damaged (the report and the viewer's index name it)."""
    path = layout.topk
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    cached = _cache.get(path)
    if cached is None or cached[0] != stamp:
        try:
            topk, info = load_topk(path)
        except ConvscopeError:
            return None
        _cache.pop(path, None)
        while len(_cache) >= _KEPT:
            _cache.pop(next(iter(_cache)))  # the oldest read
        cached = _cache[path] = (stamp, topk, info, {})
    return cached[1], cached[2], cached[3]


def rules(layout: Layout) -> tuple[str, list[str]]:
    """The scan's main rule and every rule it drew units under."""
    scanned = read_scan(layout)
    info = scanned[1] if scanned else {}
    found = [r for r in info.get("rules") or [info.get("rule") or "deconvnet"] if isinstance(r, str)]
    return (found[0] if found else "deconvnet"), found or ["deconvnet"]


def rule_of(layout: Layout, query: Mapping[str, str]) -> str:
    """The rule a page asks for (``?rule=``) where the scan drew units under it, else the scan's main one."""
    main, drawn = rules(layout)
    return query["rule"] if query.get("rule") in drawn else main


def unit_classes(layout: Layout, layer: str) -> dict[int, dict] | None:
    """unit -> its top classes ((name, count) pairs, most first), the share of its top class, and how many images
    were counted: from the scan's per-class statistics (None where the scan kept none)."""
    scanned = read_scan(layout)
    if scanned is None or layer not in scanned[0].class_values:
        return None
    topk, info, memo = scanned
    if layer not in memo:
        names = info.get("classes") if isinstance(info.get("classes"), list) else []
        try:
            hist = class_histogram(topk, layer)
        except (RuntimeError, ValueError, IndexError):  # tensors of the wrong shape: shown without classes
            return None
        memo[layer] = {}
        for u, counts in enumerate(hist.tolist()):
            total = sum(counts)
            ranked = sorted(((c, i) for i, c in enumerate(counts) if c), reverse=True)[:5]
            memo[layer][u] = {"classes": [(printable(str(names[i])) if i < len(names) else str(i), c)
                                          for c, i in ranked],
                              "share": ranked[0][0] / total if total else 0.0, "counted": total}
    return memo[layer]


def top(layout: Layout, layer: str, unit: int) -> list[dict] | None:
    """The unit's top-k activations from the scan (value, data-set image index, position), if scanned."""
    scanned = read_scan(layout)
    if scanned is None:
        return None
    topk = scanned[0]
    if layer not in topk.values or unit >= topk.values[layer].shape[0]:
        return None
    return [{"value": float(v), "image": int(i), "position": tuple(p)} for v, i, p in
            zip(topk.values[layer][unit].tolist(), topk.images[layer][unit].tolist(),
                topk.positions[layer][unit].tolist()) if i >= 0]


def unit_panel(layout: Layout, layer: str, unit: int, query: Mapping[str, str]) -> Panel:
    """The unit's Fig. 2 tile under the rule the page asks for (``?rule=``; the main one by default), the rules it
    was drawn under, the classes of its strongest images and its top-k activations."""
    main, drawn_rules = rules(layout)
    rule = rule_of(layout, query)
    drawn = [(r, r == rule) for r in drawn_rules if layout.picture(layout.unit(layer, unit, None if r == main else r))]
    path = layout.picture(layout.unit(layer, unit, None if rule == main else rule))
    patches = layout.picture(layout.unit_patches(layer, unit))
    items: list = []
    if path is not None:
        beside = ("; the image patches under them are below" if patches is not None
                  else ", left, beside the image patches under them (right)")  # an older scan's tile holds both
        items.append(Picture(path, f"{layer} unit {unit}", "Fig. 2.",
                             f"The top-9 activations of {layer} unit {unit} over the scanned images, each projected to "
                             f"pixels ({rule}){beside}.", id="unit-img"))
    if path is not None and patches is not None:
        items.append(Picture(patches, f"{layer} unit {unit}: image patches", "Fig. 2.",
                             "The image patches under its top-9 activations, in the same order.", id="unit-patches"))
    best = top(layout, layer, unit)
    if path is not None and best:
        items.append(Zoom(f"Each projection at full resolution ({rule}), computed now from the model:", len(best),
                          id="zoom"))
    stats = (unit_classes(layout, layer) or {}).get(unit)
    if stats and stats["classes"]:
        items.append(Counts(f"Classes of its {stats['counted']} strongest images:", tuple(stats["classes"]),
                            id="unit-classes"))
    if best:
        items.append(Table((("rank", tuple(str(i + 1) for i in range(len(best)))),
                            ("activation", tuple(f"{t['value']:.3g}" for t in best)),
                            ("image", tuple(str(t["image"]) for t in best)),
                            ("position", tuple(f"{t['position'][0]},{t['position'][1]}" for t in best))), id="top"))
    return Panel(items, "rule", tuple(drawn) if len(drawn) > 1 else (),
                 "" if path is not None else "No projections of this unit: `convscope scan RUN` draws every unit.")


def units(layout: Layout) -> dict[str, dict[int, Path]]:
    """The units the scan drew (layer -> unit -> tile), its layers in the order the forward pass reaches them
    (the scan's), others after them in natural order."""
    drawn = Layout.unit_files(layout.units)
    scanned = read_scan(layout)
    order = [layer for layer in (scanned[0].layers if scanned else []) if layer in drawn]
    rest = sorted((layer for layer in drawn if layer not in order), key=natural_key)
    return {layer: drawn[layer] for layer in [*order, *rest]}


def unit_thumb(layout: Layout, layer: str, unit: int) -> Path | None:
    """The unit's thumbnail (its strongest activation, projected), or its whole tile where it has none."""
    return layout.picture(layout.unit_thumb(layer, unit)) or layout.picture(layout.unit(layer, unit))


def unit_badges(layout: Layout, layer: str) -> dict[int, UnitBadge] | None:
    """Per unit of ``layer``: its top class and that class's share of its strongest images (the layer page sorts
    the most class-specific first); None where the scan kept no per-class statistics."""
    stats = unit_classes(layout, layer)
    if stats is None:
        return None
    return {u: UnitBadge(f"{s['classes'][0][0]} {round(100 * s['share'])}%", "share of its top images in its top class",
                         s["share"]) for u, s in stats.items() if s["classes"]}


__all__ = ["read_scan", "rule_of", "rules", "top", "unit_badges", "unit_classes", "unit_panel", "unit_thumb", "units"]
