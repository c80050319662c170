"""Transforms on batched torch tensors (no torchvision): the paper's crops and flips, resizing, statistics.

Paper section 3 trains on random 224 crops of 256 images with horizontal flips. For small images convscope uses
the usual analogue: pad by a few pixels, take a random crop of the original size, flip half of the images.
Every random choice comes from an explicit ``torch.Generator`` so that a resumed run repeats it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and a horizontal flip of half the images."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    flip = torch.tensor(flips)
    out[flip] = out[flip].flip(-1)
    return out


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


def mean_and_std(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean image (3, H, W) and the global pixel std of uint8 images (N, 3, H, W), scaled to [0, 1]."""
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].double() / 255.0
        total += x.sum(0)
        squares += (x * x).sum()
    n = images.shape[0]
    mean = total / n
    var = squares / (n * mean.numel()) - (mean * mean).mean()
    return mean.float(), var.clamp_min(1e-12).sqrt().float()
