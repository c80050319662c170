"""What an analysis shows of one unit in the viewer: a panel of plain data, built by the analysis from its own
files and drawn by the viewer, which names no analysis, file or schema.

A :class:`Panel` is a list of items in order: :class:`Picture` (an image of the run with a caption, an optional
row of labels under it), :class:`Counts` (names with a count each, most first), :class:`Table` (rows of cells
under a header cell), :class:`Line` (a sentence, with an optional link to one of the run's figures) and
:class:`Zoom` (links to pictures at full resolution, computed when asked for). A panel
may offer variants of itself (the projection rule): ``variants`` of (name, on), chosen with ``?<switch>=name``.
Every text is plain: the viewer escapes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Picture:
    """An image of the run: ``ref`` is the caption's bold lead (``Fig. 2.``), ``labels`` go under it (epochs);
    ``width`` the most pixels it is shown at (default the page's unit width)."""

    path: Path
    alt: str
    ref: str
    caption: str
    id: str = ""
    labels: tuple[str, ...] = ()
    width: int | None = None


@dataclass(frozen=True)
class Counts:
    """``lead`` then each (name, count), e.g. the classes of a unit's strongest images."""

    lead: str
    counts: tuple[tuple[str, int], ...]
    id: str = ""


@dataclass(frozen=True)
class Table:
    """Rows of cells, each under its header cell (the unit's top-k activations)."""

    rows: tuple[tuple[str, tuple[str, ...]], ...]
    id: str = ""


@dataclass(frozen=True)
class Line:
    """A sentence: ``before``, a link to the figure of analysis ``figure`` (its key) named ``link``, ``after``."""

    before: str
    after: str = ""
    figure: str = ""
    link: str = ""
    id: str = ""


@dataclass(frozen=True)
class Zoom:
    """``lead`` then a link to each of ``count`` pictures at full resolution, which the analysis computes when
    one is asked for (:attr:`convscope.analyses.Analysis.unit_zoom`), under the panel's variant shown."""

    lead: str
    count: int
    id: str = ""


@dataclass(frozen=True)
class Panel:
    """One analysis's part of a unit page; ``missing`` is said where the analysis has nothing for the unit yet."""

    items: list[Picture | Counts | Table | Line | Zoom] = field(default_factory=list)
    switch: str = ""  # the query parameter that picks a variant
    variants: tuple[tuple[str, bool], ...] = ()  # (name, shown now), only the variants drawn for this unit
    missing: str = ""


@dataclass(frozen=True)
class UnitBadge:
    """What a layer page says under a unit's thumbnail, the number its sort orders by (highest first), and the
    tags its filter keeps units by (a concept, a category, a verdict)."""

    text: str
    title: str
    score: float
    tags: tuple[str, ...] = ()


__all__ = ["Counts", "Line", "Panel", "Picture", "Table", "UnitBadge", "Zoom"]
