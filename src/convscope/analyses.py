"""The registry of analyses: each figure and table of the paper that convscope makes, declared once.

An :class:`Analysis` names its command (``convscope <name> RUN``), the paper's figure or table and its numbers, a
pure ``compute(run, **options) -> result``, a ``write(result, layout) -> paths``, the files that show it and the
claims it tests. Each analysis module declares its own at its end, ``register(Analysis(...))``, beside the code it
names (timm's ``register_model``); importing ``convscope`` imports them all. This module is the machinery (the
lock, compute, write, the findings and the manifest) and imports no analysis. The command line's analysis
commands are generated from the registry (each keyword of ``compute`` becomes an option, its default the
option's default), the report's sections and the viewer's figure pages read it, and one parametrized test runs
them all. Table 3 (ablation) trains models rather than reading a run, so it has its own command and registers
only its files.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts, distributed
from .errors import unknown
from .findings import write_findings
from .layout import Layout
from .panels import Panel, UnitBadge


@dataclass(frozen=True)
class Analysis:
    """One analysis: its command, the paper's reference, how it computes and writes, and which files show it.

    ``files(layout)`` gives the images and text tables the report and the viewer show; ``help`` the command's
    option texts (one per keyword of ``compute``); ``flags`` an option's flag where it is not the keyword's name;
    ``summary(result)`` the text the command prints after writing; ``make`` the command that makes the files
    (``{run}``: the run directory), listed where they are missing; ``paper`` the paper's numbers (ImageNet 2012
    unless a row says otherwise; errors and accuracies in %), from the module's own table of them."""

    name: str
    key: str
    ref: str
    title: str
    caption: str
    files: Callable[[Layout], tuple[list[Path], list[Path]]]
    compute: Callable[..., Any] | None = None
    write: Callable[[Any, Layout], list[Path]] | None = None
    help: Mapping[str, str] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)
    summary: Callable[[Any], str] | None = None
    make: str = ""
    per_layer: bool = False  # Fig. 2 and 4: one panel per layer, and a page per unit in the viewer
    projects: bool = False  # its pictures are projections (what --nonlinearities gradient changes)
    distributed: bool = False  # its work is split across the processes of torchrun (else rank 0 does it all)
    findings: Callable[[Any], list] | None = None  # the claims its result tests (convscope.findings.Finding)
    paper: Sequence[tuple[str, str]] = ()  # the paper's numbers, shown beside the run's: (what, value) rows
    check: Callable[[Layout], list[tuple[Path, str]]] | None = None  # its records there but damaged: (path, problem)
    # The viewer's unit pages (convscope.panels): the units it has a picture of (layer -> unit -> picture), which
    # the viewer lists; its panel of one unit, given the page's query (a variant to show); a unit's thumbnail; and
    # a badge per unit of a layer, which the layer page shows and can sort by.
    units: Callable[[Layout], dict[str, dict[int, Path]]] | None = None
    unit_panel: Callable[[Layout, str, int, Mapping[str, str]], Panel | None] | None = None
    unit_thumb: Callable[[Layout, str, int], Path | None] | None = None
    unit_badges: Callable[[Layout, str], dict[int, UnitBadge] | None] | None = None
    # one of a unit's pictures (1..) at full resolution, computed when the page asks (PNG bytes; None: none such)
    unit_zoom: Callable[[Layout, str, int, int, Mapping[str, str]], bytes | None] | None = None
    sort_label: str = ""  # what ordering a layer's units by its badges shows ("most class-specific first")

    @property
    def command(self) -> str:
        """The command that makes this analysis's files (``{run}`` stands for the run directory)."""
        return self.make or f"convscope {self.name} {{run}}"

    def options(self) -> list[inspect.Parameter]:
        """The keywords of ``compute`` a user sets: every parameter but the run and the progress switch."""
        if self.compute is None:
            return []
        params = list(inspect.signature(self.compute).parameters.values())[1:]
        return [p for p in params if p.name != "progress"]

    def run(self, run, **options) -> tuple[Any, list[Path]]:
        """Compute over ``run`` and write into its directory (holding its lock: one writer at a time); the result
        and the files written. Under torchrun, rank 0 holds the lock; a distributed analysis splits its work
        across the ranks, another runs on rank 0 alone (the other ranks return (None, []))."""
        group = distributed.init()
        with distributed.locked(run.path, f"convscope {self.name}", group):
            if not (self.distributed or group.main):
                return None, []
            result = self.compute(run, **options)
            paths = self.write(result, run.layout)
            if group.main and self.findings is not None:

                paths.append(write_findings(run.layout.findings, self.findings(result)))
            if group.main:
                record(run.layout, self.key, paths)
            return result, paths


def record(layout: Layout, key: str, paths: list[Path]) -> None:
    """Add ``paths`` to what the manifest says analysis ``key`` wrote (a file deleted later then shows as missing
    in the report and the viewer, rather than silently absent)."""
    manifest = written(layout)
    manifest[key] = sorted(set(manifest.get(key, [])) | {p.relative_to(layout.root).as_posix() for p in paths})
    artifacts.write_json(layout.manifest, manifest)


def written(layout: Layout) -> dict[str, list[str]]:
    """The manifest: analysis key -> the files it wrote (relative paths); empty when missing or damaged."""
    manifest = artifacts.read_json(layout.manifest)
    if not isinstance(manifest, dict):
        return {}
    return {k: [p for p in v if isinstance(p, str)] for k, v in manifest.items() if isinstance(v, list)}


def json_check(path: Path, ok: Callable[[Any], bool]) -> list[tuple[Path, str]]:
    """An analysis's ``check`` of one JSON record: nothing when it is absent or as written, else what is wrong."""
    problem = artifacts.read_record(path, ok)[1]
    return [(path, problem)] if problem else []


def existing(*paths: Path) -> list[Path]:
    """The paths that are files (an analysis's ``files``: what the run has of them)."""
    return [p for p in paths if p.is_file()]


def figure_files(key: str, *variants: str) -> Callable[[Layout], tuple[list[Path], list[Path]]]:
    """``files`` of an analysis that writes ``figures/<key><variant>.png`` (one image per variant, no text)."""
    return lambda layout: (existing(*(layout.figure(key + v) for v in variants or ("",))), [])


LAYERS_HELP = "Comma-separated layers (paper names, module names, name#k for a module's k-th call)."
SPLIT_HELP = "Data split: train, val, test, or all. [val / test on a trained run; all on an attached one]"
RULE_HELP = "Projection rule: deconvnet (the paper), guided, gradient."

REGISTRY: list[Analysis] = []  # in the paper's order: its figures, its tables, then the analyses it did not make


def _order(analysis: Analysis) -> tuple[int, int, str]:
    kind = {"Fig": 0, "Tab": 1}.get(analysis.ref[:3], 2)
    number = re.search(r"\d+", analysis.ref)
    return kind, int(number.group()) if number and kind < 2 else 0, analysis.key


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to :data:`REGISTRY` (each analysis module registers its own when it is imported, as timm's
    models do); a command name or key that another analysis has already is refused."""
    taken = {n: a.name for a in REGISTRY for n in (a.name, a.key)}
    for n in (analysis.name, analysis.key):
        if n in taken:
            raise ValueError(f"analysis {analysis.name!r}: {n!r} is taken by the analysis {taken[n]!r}")
    REGISTRY.append(analysis)
    REGISTRY.sort(key=_order)
    return analysis


def get(name: str) -> Analysis:
    """The analysis registered under a command name or a paper key (``occlusion`` or ``fig7``)."""
    for a in REGISTRY:
        if name in (a.name, a.key):
            return a
    raise unknown("analysis", name, [a.name for a in REGISTRY])


__all__ = ["LAYERS_HELP", "REGISTRY", "RULE_HELP", "SPLIT_HELP", "Analysis", "existing", "figure_files", "get",
           "json_check", "record", "register", "written"]
