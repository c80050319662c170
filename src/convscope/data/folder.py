"""ImageFolder trees (``root/<class>/**/<image>``; ImageNet, Caltech-101/256) read with Pillow.

Classes are the sub-folders of ``root`` sorted by name, as in torchvision's ``ImageFolder``; a class's images are
all files with an image extension below its folder. Hidden files and folders (a leading ".") are ignored.
Every image becomes RGB, its short side is scaled to ``size`` and the centre ``size`` x ``size`` square is kept
(Zeiler & Fergus, Section 3: "resizing the smallest dimension to 256, cropping the center 256x256 region").

Two ways in: :func:`load_folder` decodes everything into memory at once (small trees), and skips unreadable
files with one warning; :class:`FolderDataset` lists the files up front but decodes them only when indexed
(trees too big for memory), and raises on an unreadable file, since skipping one there would shift the indices.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ConvscopeError
from .base import ImageSet, check_memory
from .loader import batches

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def display_name(name: str) -> str:
    """A file or folder name as text: bytes that are not UTF-8 (kept by the OS as surrogates) shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted) and (path, label) for every image file of an ImageFolder tree, without reading any.

    Only non-empty regular files count (a FIFO or a device named ``x.png`` would block a reader), each file once.
    Folders linked in by symlinks are followed, except a link back into the tree above its class folder or into
    another class's folder, or one that closes a loop: those are skipped (a loop would add every image again,
    under the wrong class), as are dangling links, links that loop on themselves, devices, FIFOs, sockets and
    empty files named like images, all counted in one warning. Class names that are not UTF-8 are shown escaped
    (``\\xff``)."""
    classes, samples, skipped = _scan(root)
    if skipped:
        warnings.warn(_skipped_note(skipped, root), stacklevel=2)
    return classes, samples


def _skipped_note(skipped: list[str], root: str | Path, unreadable: int = 0) -> str:
    shown = "; ".join(display_name(s) for s in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    listed = len(skipped) - unreadable
    parts = [f"{unreadable} unreadable image file{'s' * (unreadable != 1)}"] if unreadable else []
    if listed:
        parts.append(f"{listed} {'entry' if listed == 1 else 'entries'} that {'is' if listed == 1 else 'are'} not "
                     f"a readable regular image")
    return f"skipped {' and '.join(parts)} of image folder {root}: {shown}"


def _entry(entry: os.DirEntry) -> str:
    """``dir``, ``image``, ``other`` (a file of another kind), or why an entry named like an image is skipped."""
    try:
        if entry.is_dir():
            return "dir"
        if not entry.name.lower().endswith(EXTENSIONS):
            return "other"
        if not entry.is_file():
            if entry.is_symlink() and not os.path.exists(entry.path):
                return "a link to nothing"
            return "not a regular file: a device, a FIFO or a socket"
        if entry.stat().st_size == 0:
            return "an empty file"
        return "image"
    except OSError as e:  # a link to itself: "Too many levels of symbolic links"
        return f"unreadable: {e.strerror or e}"


def _scan(root: str | Path) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConvscopeError(f"image folder {root} {what}; expected root/<class name>/<images>")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ConvscopeError(f"image folder {root} has no class folders; expected root/<class name>/<images>, "
                             "one sub-folder per class")
    top = root.resolve()
    classes = {name: (root / name).resolve() for name in folders}
    samples, skipped, seen_files = [], [], set()
    for label, name in enumerate(folders):
        home = classes[name]
        seen_dirs: set[tuple[int, int]] = set()
        stack = [root / name]
        while stack:
            folder = stack.pop()
            try:
                st = folder.stat()
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                skipped.append(f"{folder} (unreadable: {e.strerror or e})")
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:
                skipped.append(f"{folder} (a loop)")
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            kinds = {e.name: _entry(e) for e in entries if not e.name.startswith(".")}
            for entry in reversed([e for e in entries if kinds.get(e.name) == "dir"]):
                if entry.is_symlink():
                    target = Path(os.path.realpath(entry.path))
                    if target in top.parents or target == top or (target.is_relative_to(top)
                                                                 and not target.is_relative_to(home)):
                        skipped.append(f"{entry.path} (links to {target}, outside its class folder)")
                        continue
                stack.append(Path(entry.path))
            for entry in entries:
                kind = kinds.get(entry.name, "other")
                if kind in ("dir", "other"):
                    continue
                if kind != "image":
                    skipped.append(f"{entry.path} ({kind})")
                    continue
                real = os.path.realpath(entry.path)
                if real in seen_files:
                    skipped.append(f"{entry.path} (the same file as one already listed)")
                    continue
                seen_files.add(real)
                samples.append((Path(entry.path), label))
    if not samples:
        shown = ", ".join(display_name(c) for c in folders[:5]) + (", ..." if len(folders) > 5 else "")
        raise ConvscopeError(f"no image files ({', '.join(EXTENSIONS)}) in the class folders of {root} ({shown})")
    return [display_name(c) for c in folders], samples, skipped


def centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The box (left, top, right, bottom) of an image's centre square: what its short side scaled and centre crop
    keep."""
    s = min(width, height)
    left, top = (width - s) / 2, (height - s) / 2
    return left, top, left + s, top + s


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """One image file as uint8 (3, size, size): RGB, short side scaled to ``size`` (bilinear), centre crop.

    Cropping the centre square in the source and scaling it in one ``Image.resize(box=...)`` is the same as
    scaling then cropping, but cheaper; ``draft`` lets JPEG decode at a reduced scale that is still >= size.
    Raises ``OSError`` (or ``ValueError``, ``SyntaxError``) from Pillow when the file cannot be decoded.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=centre_square(*im.size), reducing_gap=3.0)
    pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).contiguous()


def _unreadable():
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ConvscopeError(f"image size must be a positive int, got {size!r}")


def load_folder(root: str | Path, size: int = 64, index=None, workers: int = 0) -> ImageSet:
    """An ImageFolder tree decoded into memory as an :class:`ImageSet` of uint8 (N, 3, size, size), each image's
    file path in ``sources``; ``index`` decodes only those files of :func:`scan_folder`'s list; ``workers``
    processes decode them (0: this one), the result the same.

    Files Pillow cannot decode are skipped and reported in a single warning (how many, and the first few).
    """
    return FolderDataset(root, size, index).load(workers)


DECODE_CHUNK = 64  # files a worker decodes per task


def _decode(data: FolderDataset, chunk: range) -> list[torch.Tensor | str]:
    """Files ``chunk`` of ``data`` decoded, or for an unreadable one what was wrong with it."""
    out: list[torch.Tensor | str] = []
    for i in chunk:
        try:
            out.append(read_image(data.samples[i][0], data.size))
        except _unreadable() as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


class FolderDataset(Dataset):
    """An ImageFolder tree read lazily: items are (float (3, size, size) in [0, 1], label).

    The file list is made at construction (so a bad root fails at once and ``len`` is known); a file is decoded
    only when its item is asked for. An unreadable file then raises :class:`ConvscopeError` naming it, rather
    than being skipped, because skipping would change what index ``i`` means. ``index`` keeps only those files
    of :func:`scan_folder`'s list (a split).

    It answers what the scan and training ask of an :class:`~convscope.data.ImageSet` (``batch``, ``labels``,
    ``classes``, ``sources``, ``subset``), so a tree too large for memory is scanned and trained on as it is,
    its batches decoded by worker processes (:func:`convscope.data.loader.batches`).
    """

    truth = None

    def __init__(self, root: str | Path, size: int = 64, index=None):
        _check_size(size)
        self.root, self.size = Path(root), size
        self.classes, samples, self.skipped = _scan(root)
        self.name = self.root.name
        self._keep(samples if index is None else [samples[i] for i in _indices(index)])

    def _keep(self, samples: list[tuple[Path, int]]) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.labels = torch.tensor(self.targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def image_size(self) -> int:
        return self.size

    @property
    def sources(self) -> list[str]:
        return [str(path) for path, _ in self.samples]

    def read(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 (3, size, size)."""
        path, _ = self.samples[i]
        try:
            return read_image(path, self.size)
        except _unreadable() as e:
            raise ConvscopeError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace it, "
                                 "or use load_folder, which skips unreadable files") from e

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.read(i).float() / 255.0, self.targets[i]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float in [0, 1]) and labels of many items, decoded here (in a worker, when one calls it)."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        images = torch.empty((len(index), 3, self.size, self.size), dtype=torch.uint8)
        for row, i in enumerate(index.tolist()):
            images[row] = self.read(i)
        return images.float() / 255.0, self.labels[index]

    def load(self, workers: int = 0) -> ImageSet:
        """Every file decoded into memory (by ``workers`` processes) as an :class:`ImageSet`; files Pillow cannot
        decode are skipped and reported in a single warning (how many, and the first few)."""

        n, root = len(self.samples), self.root
        check_memory(n, self.size, f"image folder {root}", bytes_per_pixel=3)
        images = torch.empty((n, 3, self.size, self.size), dtype=torch.uint8)
        labels, sources, bad = [], [], []
        chunks = [range(start, min(start + DECODE_CHUNK, n)) for start in range(0, n, DECODE_CHUNK)]
        for chunk, decoded in zip(chunks, batches(self, chunks, workers, fn=_decode)):
            for i, image in zip(chunk, decoded):
                path, label = self.samples[i]
                if isinstance(image, str):
                    bad.append(f"{path} ({image})")
                    continue
                images[len(labels)] = image
                labels.append(label)
                sources.append(str(path))
        if not n:
            return ImageSet(images, torch.zeros(0, dtype=torch.long), self.classes, name=self.name, sources=[])
        if not labels:
            raise ConvscopeError(f"none of the {n} image files under {root} could be read, e.g. {bad[0]}")
        if bad or self.skipped:  # what the listing left out and what would not decode, in one note
            warnings.warn(_skipped_note([*bad, *self.skipped], root, len(bad)), stacklevel=2)
        return ImageSet(images[: len(labels)].clone(), torch.tensor(labels, dtype=torch.long), self.classes,
                        name=self.name, sources=sources)

    def note_skipped(self) -> None:
        """Say what the listing left out (a set read lazily; :meth:`load` says it with the unreadable files)."""
        if self.skipped:
            warnings.warn(_skipped_note(self.skipped, self.root), stacklevel=3)

    def subset(self, index) -> FolderDataset:
        out = copy.copy(self)
        out._keep([self.samples[i] for i in _indices(index)])
        return out


def _indices(index) -> list[int]:
    return torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
