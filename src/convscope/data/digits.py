"""scikit-learn's bundled handwritten digits (1797 images, 8x8, values 0..16) as a small real data set.

The data ship inside scikit-learn, so nothing is downloaded. Values are scaled to 0..255, the 8x8 images
upsampled to ``size`` x ``size`` with bilinear interpolation (``torch.nn.functional.interpolate``,
``align_corners=False``, so corner pixels keep their source value exactly) and repeated to 3 channels, so
the set fits models made for RGB images (e.g. the small-data transfer experiments of Section 5.2).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConvscopeError, unknown
from .base import ImageSet

SPLITS = ("train", "test")
CLASSES = [str(d) for d in range(10)]


def digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices into scikit-learn's digits for the train and test splits: stratified by class, seeded."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ConvscopeError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    target = sk_load_digits().target
    try:
        train, test = train_test_split(np.arange(len(target)), test_size=test_fraction, stratify=target,
                                       random_state=seed)
    except ValueError as e:  # a split too small to hold every class
        raise ConvscopeError(f"test_fraction {test_fraction} leaves a split without every class of the "
                             f"{len(target)} digits ({e}); choose a value nearer 0.5") from None
    return np.sort(train), np.sort(test)


def load_digits(split: str = "train", size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> ImageSet:
    """One split of scikit-learn's digits as an :class:`ImageSet` of uint8 (N, 3, size, size), classes "0".."9".

    The split is the one :func:`digits_split` gives for ``test_fraction`` and ``seed``; images keep the order of
    scikit-learn's data within it.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in SPLITS:
        raise unknown("split", split, SPLITS)
    if not isinstance(size, int) or size < 8:
        raise ConvscopeError(f"size must be an int of at least 8 (the digits are 8x8), got {size!r}")
    index = digits_split(test_fraction, seed)[SPLITS.index(split)]
    digits = sk_load_digits()
    x = torch.from_numpy(digits.images[index]).double().unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target[index]).long()
    return ImageSet(images, labels, CLASSES, name=f"digits-{split}")
