"""The grey square that occlusion slides over an image, and the occluded forward passes: what Fig. 7
(:mod:`convscope.occlusion`), Table 1's masked parts, Fig. 5's borders, the pointing game and the sanity check
share.

Positions follow Captum's ``Occlusion``: top-left corners ``0, stride, 2 stride, ...`` while the square fits. The
default fill is the data's mean colour (the grey of a mean-subtracted input): the model's own input mean when it
has one, otherwise the mean colour of the image. The occluded passes run incrementally where that is exact
(:mod:`convscope.incremental`, Krypton), else densely, one full forward pass per position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import incremental
from .errors import ConvscopeError, unknown
from .forward import eval_mode, run_to_all
from .incremental import map_totals
from .layers import Site
from .usermodel import input_normalization


def default_fill(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The data's mean colour (C,): the mean the model subtracts from its input (a built-in model's
    ``normalize``, or an attached model's normalisation) if it is non-zero, else the images' mean."""

    norm = input_normalization(model)
    if norm is not None and norm[0].shape == (images.shape[-3],) and norm[0].any():
        return norm[0].to(images)
    return images.mean(dim=tuple(d for d in range(images.dim()) if d != images.dim() - 3)).to(images)


def as_fill(fill, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``fill`` (None, a float or a (C,) sequence/tensor) as a (C,) tensor like ``images``."""
    if fill is None:
        return default_fill(model, images)
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    channels = images.shape[-3]
    if fill.dim() == 0:
        return fill.expand(channels).clone()
    if fill.shape != (channels,):
        raise ConvscopeError(f"fill must be a number or {channels} values (one per channel), got {tuple(fill.shape)}")
    return fill


def square_positions(height: int, width: int, size: int, stride: int) -> torch.Tensor:
    """Top-left (y, x) of every occluder position, (rows, cols, 2), Captum's order and convention."""
    for name, value in (("size", size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConvscopeError(f"occluder {name} must be a positive integer number of pixels, got {value!r}")
    if size > min(height, width):
        raise ConvscopeError(f"occluder size {size} is larger than the image ({height}x{width}): "
                             f"choose a size from 1 to {min(height, width)}")
    stride = min(stride, max(height, width))  # a step past the image gives the one position at (0, 0) either way
    ys = torch.arange(0, height - size + 1, stride)
    xs = torch.arange(0, width - size + 1, stride)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


def occlude(images: torch.Tensor, corners: torch.Tensor, size: int, fill: torch.Tensor) -> torch.Tensor:
    """A ``size`` square of ``fill`` (C,) pasted at each top-left (y, x) of ``corners`` (K, 2), clipped at the
    edges: (K, C, H, W). ``images`` is one image (C, H, W), copied K times, or K images, one square each."""
    k = len(corners)
    h, w = images.shape[-2:]
    images = images.expand(k, *images.shape[-3:])
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    y, x = corners[:, 0].to(images.device), corners[:, 1].to(images.device)
    inside_y = (rows >= y[:, None]) & (rows < y[:, None] + size)
    inside_x = (cols >= x[:, None]) & (cols < x[:, None] + size)
    mask = (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1)  # (K, 1, H, W)
    return torch.where(mask, fill.view(1, -1, 1, 1), images)


def default_square(side: int) -> tuple[int, int]:
    """The grey square's side and step for an image of ``side`` px: 3/16 and 1/16 of it (12 px and 4 px at
    64 px; the paper does not state its own)."""
    return max(2, round(side * 3 / 16)), max(1, round(side / 16))


METHODS = ("auto", "incremental", "dense")


def occluded_passes(model: nn.Module, image: torch.Tensor, probe: Site | None, corners: torch.Tensor, size: int,
                    fill: torch.Tensor, method: str = "auto", approx: bool = False
                    ) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]], str, str]:
    """How the occluded images run: a function of a batch of top-left corners (K, 2) giving the probed layer's
    per-map totals (K, maps; None without a probe) and the class probabilities (K, classes); the method's name
    ("incremental", "approximate" or "dense"); and why. ``method="auto"`` runs incrementally where the engine
    is exact on this model, else densely; ``approx`` truncates the incremental change (not exact)."""
    if method not in METHODS:
        raise unknown("occlusion method", method, METHODS)
    if approx and method == "dense":
        raise ConvscopeError("approx truncates the incremental computation: use method 'auto' or 'incremental'")
    note = "method 'dense' asked for"
    if method != "dense":
        patch = fill.view(-1, 1, 1).expand(-1, size, size)
        engine, note = incremental.engine(model, image, probe, patch, corners)
        tau = incremental.TAU if approx else None
        if engine is not None:
            def passes(batch: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
                totals, logits = engine(batch, patch, tau)
                return totals, logits.softmax(-1)

            if approx:
                return passes, "approximate", (f"{note}; approximate: each layer's change truncated to {tau} of its "
                                               f"map's side (Krypton's projective-field threshold)")
            return passes, "incremental", note
        if method == "incremental":
            raise ConvscopeError(f"occlusion cannot run incrementally on this model: {note}")
        note = f"dense: {note}"
    targets = [model] if probe is None else [probe, model]

    def dense(batch: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        # Copied the moment the layer runs: a later in-place op cannot change it (as in the incremental pass).
        out = run_to_all(model, targets, occlude(image, batch, size, fill), keep=torch.clone)
        return (None if probe is None else map_totals(out[0])), out[-1].softmax(-1)

    return dense, "dense", note


def occluded_probs(model: nn.Module, image: torch.Tensor, size: int, stride: int, batch_size: int = 64,
                   method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The class probabilities of one image (C, H, W) with a grey square at every position: the positions
    (rows, cols, 2) top-left (y, x), the probabilities (rows * cols, classes), and those of the clean image.
    ``method`` as :func:`occluded_passes` takes it."""
    positions = square_positions(image.shape[-2], image.shape[-1], size, stride)
    corners, fill = positions.flatten(0, 1), as_fill(None, model, image)
    with eval_mode(model), torch.inference_mode():
        clean = model(image.unsqueeze(0)).softmax(-1)[0]
        passes = occluded_passes(model, image, None, corners, size, fill, method)[0]
        probs = torch.cat([passes(corners[i:i + batch_size])[1] for i in range(0, len(corners), batch_size)])
    return positions, probs, clean


__all__ = ["METHODS", "as_fill", "default_fill", "default_square", "occlude", "occluded_passes", "occluded_probs",
           "square_positions"]
