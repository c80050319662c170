"""Tables as the analyses write them and as the report and the viewer show them: a header, rows of cells and a
note, written as a markdown pipe table (readable as text, in a terminal, on GitHub), and read back into the same
structure (:func:`blocks`) for an HTML table with aligned numbers, the note as its caption and the paper's
columns or rows marked."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"^(-|[-+]?\d[\d.,]*(\s*(\+-|±|/)\s*[-+]?\d[\d.,]*)*\s*(%|M|px|s)?)$")
_PAPER = re.compile(r"\b(paper|TorchRay)\b", re.IGNORECASE)


@dataclass(frozen=True)
class TextTable:
    """A table: ``header`` cells, ``rows`` of as many cells, and a ``note`` (what the numbers are, where the paper's
    come from)."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""

    def __post_init__(self):
        wrong = [r for r in self.rows if len(r) != len(self.header)]
        if wrong:
            raise ValueError(f"a row of {len(wrong[0])} cells under a header of {len(self.header)}: {wrong[0]}")

    def markdown(self) -> str:
        """The table as markdown (a pipe table, then its note)."""
        lines = [_line(self.header), "|" + "---|" * len(self.header), *(_line(r) for r in self.rows)]
        return "\n".join(lines) + (f"\n\n{self.note}" if self.note else "") + "\n"

    def numeric(self, column: int) -> bool:
        """Whether every cell of ``column`` is a number (or ``-``, or ``m +- s``, ``a / b``): right-aligned."""
        cells = [r[column] for r in self.rows]
        return bool(cells) and all(_NUMBER.match(c.strip()) for c in cells) and any(c.strip() != "-" for c in cells)

    def paper_columns(self) -> set[int]:
        """The columns of the paper's (or a peer's) numbers: marked, to tell them from this run's."""
        return {i for i, h in enumerate(self.header) if _PAPER.search(h)}

    def paper_rows(self) -> set[int]:
        """The rows of the paper's numbers (a first cell that names it)."""
        return {i for i, r in enumerate(self.rows) if _PAPER.search(r[0])}


def _line(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _cells(line: str) -> tuple[str, ...]:
    inner = line.strip().removeprefix("|").removesuffix("|")
    return tuple(c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner))


_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def blocks(text: str) -> list[TextTable | str]:
    """A text file's tables and paragraphs, in order: each markdown pipe table (a header line, a rule of dashes,
    rows) as a :class:`TextTable`, with the paragraph right after it as its note; other paragraphs as text."""
    lines = text.splitlines()
    out: list[TextTable | str] = []
    paragraph: list[str] = []
    i = 0

    def close():
        if paragraph:
            out.append("\n".join(paragraph))
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|") and i + 1 < len(lines) and _RULE.match(lines[i + 1]):
            close()
            header, rows = _cells(line), []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                row = _cells(lines[i])
                rows.append((row + ("",) * len(header))[:len(header)])
                i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            note = []
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("|"):
                note.append(lines[i].strip())
                i += 1
            out.append(TextTable(header, tuple(rows), " ".join(note)))
            continue
        if line.strip():
            paragraph.append(line.rstrip())
        else:
            close()
        i += 1
    close()
    return out


__all__ = ["TextTable", "blocks"]
