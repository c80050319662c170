"""Transforms on batched torch tensors (no torchvision): the paper's crops and flips, resizing, statistics.

Paper section 3 trains on random 224 crops of 256 images with horizontal flips. For small images convscope uses
the usual analogue: pad by a few pixels, take a random crop of the original size, flip half of the images.
Every random choice comes from an explicit ``torch.Generator`` so that a resumed run repeats it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_crop_flip(n: int, pad: int, generator: torch.Generator, flip: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The random choices of :func:`random_crop_flip` for ``n`` images: offsets (n, 2) in 0..2*pad and which
    images are flipped (n,) (none when not ``flip``; the generator advances the same either way)."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips & flip


def crop_flip(x: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Translate each image by its offset (zero fill, ``pad`` pixels at most) and flip the chosen ones."""
    _, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    out[flips] = out[flips].flip(-1)
    return out


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and a horizontal flip of half the images."""
    return crop_flip(x, pad, *draw_crop_flip(len(x), pad, generator, flip))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a batch (N, C, H, W) to size x size (antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    shrinking = size < min(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def mean_and_std(images, chunk: int = 256 * 3 * 64 * 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean image (3, H, W) and the global pixel std of uint8 images (N, 3, H, W), or of an iterable
    of such batches (a set read from disk a batch at a time), scaled to [0, 1]. In float64, ``chunk`` values at a
    time (256 images of 64 px, 64 of 128 px): with 4096 images of 64 px at a time the temporaries took 1.5 GB,
    the demo's peak, and 256 images of 128 px 0.5 GB; at this size, 0.1 GB, with the same float32 results on the
    demo's data sets (checked at seeds 0-2)."""
    total = squares = None
    n = 0
    for part in [images] if isinstance(images, torch.Tensor) else images:
        step = max(1, chunk // max(1, part[0].numel())) if part.shape[0] else 1
        for start in range(0, part.shape[0], step):
            x = part[start:start + step].double() / 255.0
            total = x.sum(0) if total is None else total + x.sum(0)
            squares = (x * x).sum() if squares is None else squares + (x * x).sum()
            n += x.shape[0]
    if not n:
        raise ValueError("mean_and_std of no images")
    mean = total / n
    var = squares / (n * mean.numel()) - (mean * mean).mean()
    return mean.float(), var.clamp_min(1e-12).sqrt().float()
