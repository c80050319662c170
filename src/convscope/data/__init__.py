"""Data sets: the embedded ``synthetic`` set (the default, with ground truth; ``synthetic-parts``: the same scenes
with every eye and nose in one colour of its own, for Table 1), the embedded ``pairs`` set (a task
that needs depth, for the Table 3 ablation) and real data from disk.

``load_splits(name, ...)`` returns train / val / test :class:`ImageSet` s for any registered data set. Sets that
come with only two splits (CIFAR-10, digits) or none (an ImageFolder tree) are split further by a seeded,
per-class (stratified) draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConvscopeError, check_int, check_seed, unknown
from .base import GroundTruth, ImageSet, check_memory, fits_memory
from .cifar10 import load_cifar10
from .digits import load_digits
from .folder import FolderDataset, scan_folder
from .pairs import load_pairs
from .synthetic import CLASSES, load_synthetic
from .transforms import resize

DATASETS = ("synthetic", "synthetic-parts", "pairs", "cifar10", "digits", "folder")
SYNTHETIC = ("synthetic", "synthetic-parts")  # the embedded scenes, with ground truth


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet


def list_datasets() -> list[str]:
    return list(DATASETS)


def stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Split indices into disjoint parts with the given fractions of every class (the last part takes the rest)."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for k, f in enumerate(fractions):
            stop = start + round(f * len(idx))
            parts[k].append(idx[start:stop])
            start = stop
        parts[-1].append(idx[start:])
    return [torch.sort(torch.cat(p)).values for p in parts]


SPLITS = ("train", "val", "test")
ALL = "all"  # every image of the data set, one index space: a folder in file order, else train, val, test


@dataclass(frozen=True)
class DataSpec:
    """Everything that defines a data set's splits; :meth:`load` reads one split without reading the others.

    ``size`` is the image side (default 64, pairs 128, digits 32; CIFAR-10 is resized only when asked). ``n_*``
    truncate a split (synthetic and pairs: how many images to render; others a seeded subset). ``classes``
    restricts the synthetic set to some classes. Sets that come with two splits (CIFAR-10, digits) or none (an
    ImageFolder tree) are split further by a seeded, per-class (stratified) draw: folder 70/15/15, the training
    split of the others 90/10 into train and val.
    """

    name: str = "synthetic"
    root: str | None = None
    size: int | None = None
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    classes: tuple[str, ...] | None = None

    def check(self) -> None:
        if self.name not in DATASETS:
            raise unknown("data set", self.name, DATASETS)
        if self.size is not None:
            check_int(self.size, "image size", 8, 4096)
        check_seed(self.seed)
        for split in SPLITS:
            if self._n(split) is not None:
                check_int(self._n(split), f"n_{split}", 1, 10**9)
        if self.classes is not None and self.name not in SYNTHETIC:
            raise ConvscopeError("classes= selects classes of the synthetic data sets only")
        if self.name in ("cifar10", "folder"):
            if self.root is None:
                raise ConvscopeError(f"data set {self.name!r} needs a path: pass --data-root (or root=) to its folder")
            if not Path(self.root).exists():
                raise ConvscopeError(f"data path {str(self.root)!r} does not exist")

    @property
    def image_size(self) -> int | None:
        """The side the images will have (None: CIFAR-10 at its own 32 px)."""
        return self.size or {"synthetic": 64, "synthetic-parts": 64, "pairs": 128, "digits": 32,
                             "folder": 64}.get(self.name)

    def load(self, split: str, workers: int = 0, lazy: bool | None = None) -> ImageSet:
        """One split (``train``, ``val``, ``test``, or ``all``); an empty one is an error.

        An ImageFolder split is decoded into memory by ``workers`` processes when it fits in half of this
        machine's memory, else (or when ``lazy``) it is a :class:`~convscope.data.folder.FolderDataset`, whose
        batches are decoded as they are needed (by ``workers`` processes: :mod:`convscope.data.loader`)."""
        if split not in (*SPLITS, ALL):
            raise unknown("split", split, (*SPLITS, ALL))
        self.check()
        if self.name == "folder":
            data = self._folder(split, workers, lazy)
            data = data if split == ALL else self._truncate(data, split)
        else:
            data = self._all() if split == ALL else self._truncate(self._split(split), split)
        if len(data) == 0:
            raise ConvscopeError(f"the {split} split of data set {self.name!r} is empty")
        return data

    def class_names(self) -> list[str]:
        """The data set's class names, read as cheaply as the format allows (a folder: its sub-folders)."""
        self.check()
        if self.name == "folder":

            return scan_folder(self.root)[0]
        if self.name in SYNTHETIC:

            return list(self.classes or CLASSES)
        return self.load("test").classes

    def _n(self, split: str) -> int | None:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def _split(self, split: str) -> ImageSet:
        size = self.image_size
        if self.name in SYNTHETIC:

            classes = list(self.classes) if self.classes is not None else None
            return load_synthetic(split, n=self._n(split), size=size, seed=self.seed, classes=classes,
                                  fixed_parts=self.name == "synthetic-parts")
        if self.name == "pairs":

            return load_pairs(split, n=self._n(split), size=size, seed=self.seed)
        source = "test" if split == "test" else "train"
        if self.name == "cifar10":

            full = load_cifar10(self.root, source)
            if self.size and self.size != full.image_size:
                full = resized(full, self.size)
        else:

            full = load_digits(source, size=size, seed=self.seed)
        if split == "test":
            return full
        train, val = stratified_split(full.labels, (0.9,), self.seed)
        return full.subset(train if split == "train" else val)

    def _truncate(self, data: ImageSet, split: str) -> ImageSet:
        n = self._n(split)
        if n is None or self.name in (*SYNTHETIC, "pairs"):  # the generated sets render exactly n
            return data
        return data.subset(seeded_subset(len(data), n, self.seed))

    def _all(self) -> ImageSet:
        return concat([self.load(split) for split in SPLITS])

    def _folder(self, split: str, workers: int, lazy: bool | None):
        """A split of an ImageFolder tree (70/15/15 per class, seeded), or all of it in file order; the tree is
        listed once."""

        data = FolderDataset(self.root, self.image_size)
        if split != ALL:
            data = data.subset(dict(zip(SPLITS, stratified_split(data.labels, (0.7, 0.15), self.seed)))[split])
        if lazy or (lazy is None and not fits_memory(len(data), self.image_size)):
            data.note_skipped()
            return data
        return data.load(workers)


def load_splits(name: str = "synthetic", root: str | Path | None = None, size: int | None = None,
                seed: int = 0, n_train: int | None = None, n_val: int | None = None,
                n_test: int | None = None, classes: list[str] | None = None) -> Splits:
    """Load a data set's train, val and test sets (see :class:`DataSpec`). ``root`` is needed for cifar10 and
    folder."""
    spec = DataSpec(name, None if root is None else str(root), size, seed, n_train, n_val, n_test,
                    None if classes is None else tuple(classes))
    spec.check()
    return Splits(*(spec.load(split) for split in SPLITS))


def concat(sets: list[ImageSet]) -> ImageSet:
    """Image sets of one size and one class list, one after another (ground truth and sources kept if all
    have them)."""
    first = sets[0]
    truth = None
    if all(s.truth is not None for s in sets):
        scenes = [s.truth.scenes for s in sets]
        truth = GroundTruth(torch.cat([s.truth.boxes for s in sets]), torch.cat([s.truth.masks for s in sets]),
                            {k: torch.cat([s.truth.parts[k] for s in sets]) for k in first.truth.parts},
                            torch.cat(scenes) if all(t is not None for t in scenes) else None)
    sources = sum((s.sources for s in sets), []) if all(s.sources is not None for s in sets) else None
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]), first.classes, truth,
                    first.name, sources)


def seeded_subset(total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded random subset of ``n`` of ``range(total)`` (all of them when ``n >= total``), in ascending order
    (sets on disk are often sorted by class, so the first n would not do)."""
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(total, generator=g)[:n]).values


def resized(data: ImageSet, size: int) -> ImageSet:

    check_memory(len(data), size, f"{data.name} resized", bytes_per_pixel=3 * 4 + 3)  # float while resizing
    images = resize(data.images.float(), size).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, data.labels, data.classes, None, data.name, data.sources)


__all__ = ["ALL", "DATASETS", "SPLITS", "SYNTHETIC", "DataSpec", "GroundTruth", "ImageSet", "Splits", "concat",
           "list_datasets", "load_splits", "seeded_subset", "stratified_split"]
