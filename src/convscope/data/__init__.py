"""Data sets: the embedded ``synthetic`` set (the default, with ground truth), the embedded ``pairs`` set (a task
that needs depth, for the Table 3 ablation) and real data from disk.

``load_splits(name, ...)`` returns train / val / test :class:`ImageSet` s for any registered data set. Sets that
come with only two splits (CIFAR-10, digits) or none (an ImageFolder tree) are split further by a seeded,
per-class (stratified) draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConvscopeError, unknown
from .base import GroundTruth, ImageSet

DATASETS = ("synthetic", "pairs", "cifar10", "digits", "folder")


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


def load_splits(name: str = "synthetic", root: str | Path | None = None, size: int | None = None,
                seed: int = 0, n_train: int | None = None, n_val: int | None = None,
                n_test: int | None = None, classes: list[str] | None = None) -> Splits:
    """Load a data set's train, val and test sets. ``root`` is needed for cifar10 and folder.

    ``size`` is the image side (default 64, pairs 128; CIFAR-10 is resized only when asked). ``n_*`` truncate a
    split (synthetic and pairs: how many images to render). ``classes`` restricts the synthetic set to some classes.
    """
    if name not in DATASETS:
        raise unknown("data set", name, DATASETS)
    if classes is not None and name != "synthetic":
        raise ConvscopeError("classes= selects classes of the synthetic data set only")
    if name in ("cifar10", "folder"):
        if root is None:
            raise ConvscopeError(f"data set {name!r} needs a path: pass --data-root (or root=) to its folder")
        if not Path(root).exists():
            raise ConvscopeError(f"data path {str(root)!r} does not exist")
    if name == "synthetic":
        from .synthetic import load_synthetic

        size = size or 64
        splits = Splits(*(load_synthetic(split, n=n, size=size, seed=seed, classes=classes)
                          for split, n in (("train", n_train), ("val", n_val), ("test", n_test))))
    elif name == "pairs":
        from .pairs import DEFAULT_SIZE, load_pairs

        splits = Splits(*(load_pairs(split, n=n, size=size or DEFAULT_SIZE, seed=seed)
                          for split, n in (("train", n_train), ("val", n_val), ("test", n_test))))
    else:
        if name == "folder":
            from .folder import load_folder

            full = load_folder(root, size=size or 64)
            train, val, test = stratified_split(full.labels, (0.7, 0.15), seed)
            splits = Splits(full.subset(train), full.subset(val), full.subset(test))
        else:
            if name == "cifar10":
                from .cifar10 import load_cifar10

                train_full, test = load_cifar10(root, "train"), load_cifar10(root, "test")
            else:
                from .digits import load_digits

                train_full, test = (load_digits(s, size=size or 32, seed=seed) for s in ("train", "test"))
            train, val = stratified_split(train_full.labels, (0.9,), seed)
            splits = Splits(train_full.subset(train), train_full.subset(val), test)
        if size and name == "cifar10" and size != splits.train.image_size:
            splits = Splits(*(resized(s, size) for s in (splits.train, splits.val, splits.test)))
        splits = Splits(*(s if n is None else s.subset(seeded_subset(len(s), n, seed))
                          for s, n in ((splits.train, n_train), (splits.val, n_val), (splits.test, n_test))))
    for split in ("train", "val", "test"):
        if len(getattr(splits, split)) == 0:
            raise ConvscopeError(f"the {split} split of data set {name!r} is empty")
    return splits


def seeded_subset(total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded random subset of ``n`` of ``range(total)`` (all of them when ``n >= total``), in ascending order
    (sets on disk are often sorted by class, so the first n would not do)."""
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(total, generator=g)[:n]).values


def resized(data: ImageSet, size: int) -> ImageSet:
    from .transforms import resize

    images = resize(data.images.float(), size).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, data.labels, data.classes, None, data.name)


__all__ = ["DATASETS", "GroundTruth", "ImageSet", "Splits", "list_datasets", "load_splits", "seeded_subset",
           "stratified_split"]
