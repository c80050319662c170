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

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ConvscopeError
from .base import ImageSet, check_memory

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def display_name(name: str) -> str:
    """A file or folder name as text: bytes that are not UTF-8 (kept by the OS as surrogates) shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted) and (path, label) for every image file of an ImageFolder tree, without reading any.

    Only regular files count (a FIFO or a device named ``x.png`` would block a reader), each file once. Folders
    linked in by symlinks are followed, except a link back into the tree above its class folder or into another
    class's folder, or one that closes a loop: those are skipped with one warning (a loop would add every image
    again, under the wrong class). Class names that are not UTF-8 are shown escaped (``\\xff``)."""
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
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen_dirs:
                skipped.append(f"{folder} (a loop)")
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
            for entry in reversed([e for e in entries if not e.name.startswith(".") and e.is_dir()]):
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if target in top.parents or target == top or (target.is_relative_to(top)
                                                                 and not target.is_relative_to(home)):
                        skipped.append(f"{entry.path} (links to {target}, outside its class folder)")
                        continue
                stack.append(Path(entry.path))
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.lower().endswith(EXTENSIONS):
                    continue
                if not entry.is_file():  # follows a symlink; a FIFO, socket or device is not a regular file
                    skipped.append(f"{entry.path} (not a regular file)")
                    continue
                real = os.path.realpath(entry.path)
                if real in seen_files:
                    skipped.append(f"{entry.path} (the same file as one already listed)")
                    continue
                seen_files.add(real)
                samples.append((Path(entry.path), label))
    if skipped:
        shown = "; ".join(display_name(s) for s in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        warnings.warn(f"skipped {len(skipped)} entries of image folder {root}: {shown}", stacklevel=2)
    if not samples:
        shown = ", ".join(display_name(c) for c in folders[:5]) + (", ..." if len(folders) > 5 else "")
        raise ConvscopeError(f"no image files ({', '.join(EXTENSIONS)}) in the class folders of {root} ({shown})")
    return [display_name(c) for c in folders], samples


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
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) / 2, (h - s) / 2
    box = (left, top, left + s, top + s)
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).contiguous()


def _unreadable():
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ConvscopeError(f"image size must be a positive int, got {size!r}")


def load_folder(root: str | Path, size: int = 64, index=None) -> ImageSet:
    """An ImageFolder tree decoded into memory as an :class:`ImageSet` of uint8 (N, 3, size, size), each image's
    file path in ``sources``; ``index`` decodes only those files of :func:`scan_folder`'s list.

    Files Pillow cannot decode are skipped and reported in a single warning (how many, and the first few).
    """
    _check_size(size)
    classes, samples = scan_folder(root)
    if index is not None:
        samples = [samples[i] for i in torch.as_tensor(index, dtype=torch.long).tolist()]
    check_memory(len(samples), size, f"image folder {root}", bytes_per_pixel=3)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    labels, sources, bad = [], [], []
    for path, label in samples:
        try:
            images[len(labels)] = read_image(path, size)
        except _unreadable() as e:
            bad.append(f"{path} ({type(e).__name__}: {e})")
            continue
        labels.append(label)
        sources.append(str(path))
    if not samples:
        return ImageSet(images, torch.zeros(0, dtype=torch.long), classes, name=Path(root).name, sources=[])
    if not labels:
        raise ConvscopeError(f"none of the {len(samples)} image files under {root} could be read, e.g. {bad[0]}")
    if bad:
        shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) of {len(samples)} under {root}: {shown}",
                      stacklevel=2)
    return ImageSet(images[: len(labels)].clone(), torch.tensor(labels, dtype=torch.long), classes,
                    name=Path(root).name, sources=sources)


class FolderDataset(Dataset):
    """An ImageFolder tree read lazily: items are (float (3, size, size) in [0, 1], label).

    The file list is made at construction (so a bad root fails at once and ``len`` is known); a file is decoded
    only when its item is asked for. An unreadable file then raises :class:`ConvscopeError` naming it, rather
    than being skipped, because skipping would change what index ``i`` means.
    """

    def __init__(self, root: str | Path, size: int = 64):
        _check_size(size)
        self.root, self.size = Path(root), size
        self.classes, self.samples = scan_folder(root)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            image = read_image(path, self.size)
        except _unreadable() as e:
            raise ConvscopeError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace it, "
                                 "or use load_folder, which skips unreadable files") from e
        return image.float() / 255.0, label
