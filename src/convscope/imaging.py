"""Tensors <-> images: display normalisation of projections (paper Figs. 2, 4, 6, 7), PIL conversion, grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_image(projection: torch.Tensor, percentile: float = 99.5) -> np.ndarray:
    """A projection as the paper shows it (section 2.1, Fig. 2): uint8 (H, W, 3), or (N, H, W, 3) for a batch.

    Contrast is enhanced per image: 0 maps to mid grey (128) and ``+-s`` to 255 / 1, where ``s`` is the given
    percentile of ``|x|`` over the image (100 = the maximum), so a few extreme pixels do not wash out the
    rest; values beyond are clipped. A dead projection (all zero) gives a flat grey image, never NaN.
    """
    shades = display(projection, percentile)
    return shades.round().to(torch.uint8).numpy()


def display(projection: torch.Tensor, percentile: float = 99.5) -> torch.Tensor:
    """The grey levels :func:`to_image` rounds: float64 (H, W, 3) or (N, H, W, 3) in [0, 255]."""
    x = projection.detach().to(torch.float64).cpu()
    if x.dim() not in (3, 4):
        raise ValueError(f"expected a (C, H, W) or (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    batch = x if x.dim() == 4 else x.unsqueeze(0)
    # numpy's quantile (a partition) gives torch.quantile's numbers (both interpolate linearly) 15x faster
    q = torch.from_numpy(np.quantile(batch.abs().flatten(1).numpy(), percentile / 100.0, axis=1))
    scale = torch.where(q > 0, 127.0 / q, torch.zeros_like(q)).view(-1, 1, 1, 1)
    out = (batch * scale + 128.0).clamp(0, 255).permute(0, 2, 3, 1)
    return out if x.dim() == 4 else out[0]


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) float tensor in [0, 1] (clipped) as an RGB PIL image."""
    arr = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image file's pixels as a (3, H, W) float32 tensor in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def make_grid(
    images: Sequence[np.ndarray] | np.ndarray, nrow: int = 3, pad: int = 2, fill: int = 255
) -> np.ndarray:
    """Tile uint8 (H, W, 3) images row by row, ``nrow`` per row, ``pad`` pixels of ``fill`` between and around
    (paper Fig. 2's 3x3 blocks of top-9 patches)."""
    images = [np.asarray(im, dtype=np.uint8) for im in images]
    if not images:
        raise ValueError("make_grid needs at least one image")
    h, w = images[0].shape[:2]
    if any(im.shape != images[0].shape for im in images):
        raise ValueError("make_grid needs images of one shape")
    cols = min(nrow, len(images))
    rows = -(-len(images) // cols)
    grid = np.full((pad + rows * (h + pad), pad + cols * (w + pad), *images[0].shape[2:]), fill, np.uint8)
    for i, im in enumerate(images):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[y : y + h, x : x + w] = im
    return grid


def upscale(tile: np.ndarray, min_side: int) -> np.ndarray:
    """Enlarge a small uint8 (H, W, 3) tile by an integer factor (nearest neighbour, pixels stay crisp) until its
    shorter side is at least ``min_side``."""
    factor = max(1, -(-min_side // max(1, min(tile.shape[:2]))))
    if factor == 1:
        return tile
    return np.asarray(Image.fromarray(tile).resize((tile.shape[1] * factor, tile.shape[0] * factor),
                                                   Image.Resampling.NEAREST))


def caption(picture: np.ndarray, text: str | None) -> np.ndarray:
    """A uint8 (H, W, 3) picture with ``text`` in a white band below it, wrapped to its width (None: the picture
    as it is): for what a figure must say about how it was made."""
    if not text:
        return picture
    import textwrap

    from PIL import ImageDraw

    lines = textwrap.wrap(text, width=max(8, picture.shape[1] // 6))  # Pillow's default font: about 6 px a letter
    band = Image.new("RGB", (picture.shape[1], 12 * len(lines) + 4), (255, 255, 255))
    ImageDraw.Draw(band).multiline_text((2, 2), "\n".join(lines), fill=(90, 0, 0), spacing=1)
    return np.concatenate([picture, np.asarray(band)], axis=0)


__all__ = ["caption", "make_grid", "upscale", "pil_to_tensor", "tensor_to_pil", "to_image"]
