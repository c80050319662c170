"""The shape every data set takes in convscope.

A data set is a ``torch.utils.data.Dataset`` whose items are ``(image, label)``: ``image`` a float tensor
(3, H, W) with values in [0, 1], ``label`` an int; it has ``classes`` (list of names). In-memory sets are
:class:`ImageSet`; the embedded synthetic set adds :class:`GroundTruth`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..errors import ConvscopeError
from ..memory import machine


@dataclass
class GroundTruth:
    """Per-image ground truth of the embedded data set.

    boxes: (N, 4) float, x0, y0, x1, y1 in pixels (x1, y1 exclusive); masks: (N, H, W) bool, the object's pixels;
    parts: part name -> (N, 2) float pixel (x, y) of that part's centre, NaN where the image has no such part;
    scenes: (N, 4) int64, which rendered scene each image is (the embedded set's: its concept maps are rendered
    from it), or None.
    """

    boxes: torch.Tensor
    masks: torch.Tensor
    parts: dict[str, torch.Tensor]
    scenes: torch.Tensor | None = None

    def subset(self, index: torch.Tensor) -> GroundTruth:
        return GroundTruth(self.boxes[index], self.masks[index], {k: v[index] for k, v in self.parts.items()},
                           None if self.scenes is None else self.scenes[index])


class ImageSet(Dataset):
    """Images held in memory as uint8 (N, 3, H, W), labels int64 (N,), class names, optional ground truth, and
    optionally where each image came from (``sources``: file paths of an ImageFolder tree)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                 truth: GroundTruth | None = None, name: str = "", sources: list[str] | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels, self.classes = images, labels.long(), list(classes)
        if sources is not None and len(sources) != images.shape[0]:
            raise ValueError(f"sources must name {images.shape[0]} images, got {len(sources)}")
        self.truth, self.name, self.sources = truth, name, sources

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() / 255.0, int(self.labels[i])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float in [0, 1]) and labels for many indices at once: the fast path for training and scans."""
        return self.images[index].float() / 255.0, self.labels[index]

    def subset(self, index) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        truth = self.truth.subset(index) if self.truth is not None else None
        sources = [self.sources[i] for i in index.tolist()] if self.sources is not None else None
        return ImageSet(self.images[index], self.labels[index], self.classes, truth, self.name, sources)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


def fits_memory(n: int, size: int, bytes_per_pixel: int = 3) -> bool:
    """Whether ``n`` images of ``size`` px (``bytes_per_pixel`` per pixel) take at most half of this machine's
    memory (the rule :func:`check_memory` enforces)."""
    total = machine()
    return total is None or n * size * size * bytes_per_pixel <= total // 2


def check_memory(n: int, size: int, what: str, bytes_per_pixel: int = 4) -> None:
    """Refuse, before allocating, a set of ``n`` images of ``size`` px whose arrays (``bytes_per_pixel`` per pixel
    in all: 3 colour bytes, a mask byte) would take more than half of this machine's memory."""

    if not fits_memory(n, size, bytes_per_pixel):
        need, total = n * size * size * bytes_per_pixel, machine()
        raise ConvscopeError(f"{what}: {n} images of {size}x{size} px need {need / 2**30:.1f} GiB of memory, more "
                             f"than half of this machine's {total / 2**30:.0f} GiB; ask for fewer images (--n-train, "
                             "--n-val, --n-test) or a smaller --image-size")
