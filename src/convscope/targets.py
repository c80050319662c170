"""Target sets for the per-layer probes (Table 7) and transfer (Tables 4-5, Fig. 9): a training pool and a test
set of images, at the run's image size."""

from __future__ import annotations

import os

from .data import ImageSet, stratified_split
from .data.digits import load_digits
from .data.folder import load_folder
from .data.synthetic import CLASSES, load_synthetic
from .errors import ConvscopeError, unknown

TARGETS = ("heldout", "digits", "folder", "run")


def load_target(target: str, run=None, data_root: str | os.PathLike | None = None, seed: int = 0,
                size: int | None = None, n_train: int | None = None,
                n_test: int | None = None) -> tuple[ImageSet, ImageSet]:
    """A target set as (training pool, test set).

    ``heldout``: the synthetic classes the run was not trained on (needs a run pretrained on some classes);
    ``n_train`` / ``n_test`` images, default 150 / 100 per class (30 per class x 5 disjoint folds).
    ``digits``: scikit-learn's digits at the run's image size, its own train/test split.
    ``folder``: an ImageFolder tree at ``data_root`` (Caltech-101/256), split per class 70/30, seeded.
    ``run``: the run's own train and test splits.
    """
    if target not in TARGETS:
        raise unknown("target", target, TARGETS)
    if size is None:
        size = run.image_size if run is not None else 64
    if target == "run":
        if run is None:
            raise ConvscopeError("target 'run' needs a run")
        return run.split("train"), run.split("test")
    if target == "heldout":

        data = getattr(run, "data", None)
        if data is None or data.name != "synthetic":
            raise ConvscopeError("target 'heldout' needs a run pretrained on the synthetic data set")
        seen = data.classes or CLASSES
        others = [c for c in CLASSES if c not in seen]
        if len(others) < 2:
            raise ConvscopeError(f"the run was trained on {len(seen)} of the {len(CLASSES)} synthetic classes, "
                                 "leaving fewer than two held out; pretrain with classes= a subset (e.g. six)")
        # images of classes the run never saw; its own seed, so the pool is reproducible from the run alone
        n_train = n_train if n_train is not None else 150 * len(others)
        n_test = n_test if n_test is not None else 100 * len(others)
        return (load_synthetic("train", n=n_train, size=size, seed=data.seed, classes=others),
                load_synthetic("test", n=n_test, size=size, seed=data.seed, classes=others))
    if target == "digits":

        return load_digits("train", size=size, seed=seed), load_digits("test", size=size, seed=seed)

    if data_root is None:
        raise ConvscopeError("target 'folder' needs data_root: the folder of the ImageFolder tree")
    full = load_folder(data_root, size=size)
    pool, test = stratified_split(full.labels, (0.7,), seed)
    return full.subset(pool), full.subset(test)


__all__ = ["TARGETS", "load_target"]
