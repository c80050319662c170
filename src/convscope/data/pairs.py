"""The embedded set ``pairs``: a small task that needs depth, for the architecture ablation (paper Table 3).

Each image (128 px by default) holds two discs, one in the left fifth of the image and one in the right fifth,
each red or blue, on a smooth, noisy grey background. The class is ``same`` when the two discs have one colour
and ``different`` otherwise. Neither disc alone says anything about the class (each colour is equally likely
in both classes), so a network has to combine the two, and they are at least 0.62 image sides (79 px at 128 px)
apart, edge to edge.

Why this shows the paper's finding when the twelve-class ``synthetic`` set does not: in zfnet_small without
conv3-4 (conv1, pool1, conv2, pool2, conv5) a conv5 unit sees 75 px (:func:`convscope.receptive_field`), so no
unit sees both discs, and what follows is max-pooling and the linear fc8. A linear read-out of features that
each see one disc cannot say "same": scores s(a) + t(b) with s(red) + t(red) > 0 and s(blue) + t(blue) > 0 but
s(red) + t(blue) < 0 and s(blue) + t(red) < 0 cannot exist (the first two sum to the last two). Keeping
conv3-4 (conv5 then sees 139 px) or fc6-7 (the whole image) gives the net a place to combine the discs. So
removing conv3-4 and fc6-7 together leaves the net at chance, while removing either alone costs nothing: the
paper's Table 3 contrast. (A pool5 unit's window reaches from one disc to a few pixels of the other, at the far
edge of its conv5 units' fields; measured, that does not help.) The twelve-class set has no such need: a conv5
unit of the 4-layer net sees most of a 64 px image, and the classes are told apart by parts lying close
together.

Determinism as for ``synthetic``: image ``i`` of a split is drawn from its own generator, seeded by
``(seed, split, i)``, so it does not depend on ``n``; labels alternate (``different``, ``same``, ...). The set
renders in a few seconds and is not cached. Ground truth: the discs' pixels (mask), their joint box, and the
centres ``left_disc`` and ``right_disc``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import ConvscopeError
from .base import GroundTruth, ImageSet, check_memory
from .synthetic import SUPERSAMPLE, _background, _box, _check, _circle, _hsv_to_rgb, _to_canvas

CLASSES = ["different", "same"]
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 230)}
PARTS = ["left_disc", "right_disc"]
DEFAULT_N = {"train": 2000, "val": 500, "test": 500}
DEFAULT_SIZE = 128
FIFTH = 0.19  # each disc lies in the outer 0.19 of the image side (with a 0.01 margin at the border)
RADIUS = (0.061, 0.081)  # image sides: 16-21 px across at 128 px
_STREAM = 7  # keeps these generators apart from the synthetic set's ([seed, split, i])


def _scene(seed: int, split_id: int, index: int) -> tuple[dict, list[tuple[float, float, float, tuple]]]:
    rng = np.random.default_rng([seed, _STREAM, split_id, index])
    # muted (grey-ish) gradients: the discs' colours stand out, the background carries no class
    bg = {"c1": _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)) * 0.3 + 90,
          "c2": _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)) * 0.3 + 90,
          "angle": rng.uniform(0, 2 * np.pi), "noise1": rng.normal(0, 22, size=(6, 6, 3)),
          "noise2": rng.normal(0, 10, size=(14, 14, 3)), "stripes": None}
    same = index % 2 == 1
    left = int(rng.integers(2))
    names = list(COLOURS)
    discs = []
    for side, colour in ((0, names[left]), (1, names[left if same else 1 - left])):
        r = float(rng.uniform(*RADIUS))
        lo, hi = (0.01 + r, FIFTH - r) if side == 0 else (1 - FIFTH + r, 0.99 - r)
        x, y = float(rng.uniform(lo, hi)), float(rng.uniform(0.01 + r, 0.99 - r))
        rgb = np.clip(np.array(COLOURS[colour], float) + rng.normal(0, 12, 3), 0, 255)
        discs.append((x, y, r, tuple(int(v) for v in rgb)))
    return bg, discs


def _render(bg: dict, discs, size: int) -> tuple[np.ndarray, np.ndarray]:
    canvas = size * SUPERSAMPLE
    back = np.clip(_background(bg, size), 0, 255).astype(np.uint8)
    img = Image.fromarray(back, "RGB").resize((canvas, canvas), Image.NEAREST)
    mask = Image.new("L", (canvas, canvas), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for x, y, r, rgb in discs:
        xy = _to_canvas(_circle(x, y, r), canvas)
        draw.polygon(xy, fill=rgb)
        mdraw.polygon(xy, fill=255)
    return np.asarray(img.reduce(SUPERSAMPLE)).copy(), np.asarray(mask.reduce(SUPERSAMPLE)) >= 128


def load_pairs(split: str = "train", n: int | None = None, size: int = DEFAULT_SIZE, seed: int = 0) -> ImageSet:
    """The ``pairs`` set, split ``train`` / ``val`` / ``test`` (default sizes 2000 / 500 / 500), classes
    ``different`` and ``same``. See the module doc for why it needs depth at 128 px (at 64 px it does not: a
    conv5 unit of the net without conv3-4 then sees both discs)."""
    split_id, _ = _check(split, size, seed, None)  # the synthetic set's checks: split, size, seed
    n = DEFAULT_N[split] if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConvscopeError(f"n must be a non-negative integer, got {n!r}")
    check_memory(n, size, f"the pairs set's {split} split")
    images = np.empty((n, 3, size, size), np.uint8)
    masks = np.empty((n, size, size), bool)
    centres = np.empty((n, len(PARTS), 2), np.float32)
    for i in range(n):
        bg, discs = _scene(seed, split_id, i)
        image, masks[i] = _render(bg, discs, size)
        images[i] = image.transpose(2, 0, 1)
        centres[i] = [(x * size, y * size) for x, y, _, _ in discs]
    boxes = np.stack([_box(m) for m in masks]) if n else np.empty((0, 4), np.float32)
    truth = GroundTruth(torch.from_numpy(boxes), torch.from_numpy(masks),
                        {p: torch.from_numpy(np.ascontiguousarray(centres[:, k])) for k, p in enumerate(PARTS)})
    labels = torch.arange(n, dtype=torch.int64) % 2
    return ImageSet(torch.from_numpy(images), labels, CLASSES, truth, name=f"pairs/{split}")
