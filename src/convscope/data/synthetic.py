"""The embedded data set ``synthetic``: objects made of named parts on cluttered backgrounds, with ground truth.

Each of the :data:`CLASSES` is an arrangement of simple shapes (discs, ellipses, rectangles, triangles, bars),
and the shapes recur across classes (discs are eyes, wheels, bells, a clock's dial), so only the arrangement
tells the classes apart. Every part gets a random colour from one palette, shared by all classes, so colour does
not classify. Each image has a random pose (position, scale 0.7-1.3, in-plane rotation +-30 degrees, horizontal
flip), a background made of a colour gradient, smooth noise, sometimes stripes, and a few small distractor
shapes drawn behind the object, plus faint pixel noise.

The ground truth (:class:`~convscope.data.base.GroundTruth`) is what lets convscope check its analyses against
the paper: the box and mask say where the object is (occlusion sensitivity, paper Fig. 7, should find it; the
top-9 patches of paper Fig. 2 should land on it), the part centres say where its parts are (the correspondence
experiment of paper Table 1 masks ``left_eye``, ``right_eye`` and ``nose`` of face images), and
:func:`render_pose` moves the object over an unchanged background (invariance, paper Fig. 5).

Determinism: image ``i`` of a split is drawn from ``np.random.default_rng([seed, split_id, i])`` alone, so it is
the same whatever ``n`` is, on any machine, with no threads involved. Labels cycle through the classes
(image ``i`` has class ``i % len(CLASSES)``): every prefix of a split is balanced to within one image per class.
A set restricted with ``classes=`` is a subset of the full set: its image ``j`` is the image of the full set with
class ``classes[j % k]`` and round ``j // k``, relabelled ``j % k``.

Geometry: pixel ``(col, row)`` covers ``[col, col+1) x [row, row+1)``; part centres are continuous ``(x, y)`` in
these units, so the pixel holding a centre is ``(floor(x), floor(y))``. A scene is defined in units of the image
side, so the same scene renders at 64 px (the default) or 224 px; drawing is done at twice the size and reduced
by box averaging (anti-aliasing); a mask pixel is the object's when at least half of it is covered.

Parts that correspond (``fixed_parts=True``, the data set ``synthetic-parts``): the same scenes, with every eye
and nose (:data:`FIXED_PARTS`: the face's, the robot's, the fish's, the rocket's nose cone) drawn in one colour of
its own in every image, as the eyes and noses of the paper's dogs look alike across breeds, while every other
colour varies as before. Paper Table 1 asks whether a net relates such parts across images; on the default set,
where an eye may take any colour, it has nothing to relate.

Part names ``left_*`` / ``right_*`` are as the viewer sees the upright object (a flipped face's ``left_eye`` is
still the eye on the image's left before rotation); other names follow the object (a flipped car's
``front_wheel`` is on the left).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..artifacts import save_npz
from ..errors import ConvscopeError, unknown
from .base import GroundTruth, ImageSet, check_memory

GENERATOR_VERSION = 1
"""Bump whenever a change alters any rendered pixel: it is part of the cache key."""

SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_N = {"train": 10000, "val": 1000, "test": 2000}

SUPERSAMPLE = 2
BASE_SIZE = 0.45  # object side as a fraction of the image side at scale 1: 0.32-0.58 over the scale range
SCALE_RANGE = (0.7, 1.3)
ROTATION_RANGE = 30.0  # degrees either way: a house upside down would be another arrangement
MARGIN = 0.02  # sampled poses keep the object's box this far (image sides) inside the image

_ROUND = 1.0 / 64.0  # vertices are rounded (in supersampled pixels) so 1-ulp libm differences cannot move a pixel


# --------------------------------------------------------------------------------------------------- shapes
# Canonical object frame: x right, y down, the object spans about [-0.5, 0.5] on its longer axis.

@lru_cache(maxsize=8)
def _unit_circle(k: int = 24) -> np.ndarray:
    t = np.arange(k) * (2.0 * np.pi / k)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _rot(pts: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return pts @ np.array([[c, s], [-s, c]])


SHAPES = ["disc", "ellipse", "rectangle", "triangle", "bar", "polygon", "plus", "star"]
"""The shapes a scene is drawn from (a concept category of the dissection): the object's and the distractors'."""


class _Shape(np.ndarray):
    """A polygon's vertices (an array like any other: arithmetic on it gives plain values), tagged with the shape
    it draws."""

    kind: str


def _tag(pts: np.ndarray, kind: str) -> np.ndarray:
    shape = pts.view(_Shape)
    shape.kind = kind
    return shape


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    pts = _unit_circle() * np.array([rx, ry])
    if angle:
        pts = _rot(pts, angle)
    return _tag(pts + np.array([cx, cy]), "ellipse")


def _circle(cx: float, cy: float, r: float) -> np.ndarray:
    return _tag(_ellipse(cx, cy, r, r), "disc")


def _rect(cx: float, cy: float, w: float, h: float, angle: float = 0.0) -> np.ndarray:
    pts = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    if angle:
        pts = _rot(pts, angle)
    return _tag(pts + np.array([cx, cy]), "rectangle")


def _bar(x0: float, y0: float, x1: float, y1: float, w: float) -> np.ndarray:
    d = np.array([x1 - x0, y1 - y0], dtype=float)
    n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-9) * (w / 2)
    p0, p1 = np.array([x0, y0]), np.array([x1, y1])
    return _tag(np.stack([p0 + n, p1 + n, p1 - n, p0 - n]), "bar")


def _poly(*pts: tuple[float, float]) -> np.ndarray:
    return _tag(np.array(pts, dtype=float), "triangle" if len(pts) == 3 else "polygon")


def _centroid(poly: np.ndarray) -> tuple[float, float]:
    c = poly.mean(axis=0)
    return float(c[0]), float(c[1])


@dataclass
class _Part:
    name: str | None  # None: drawn and part of the object's mask, but not a named part
    polys: list[np.ndarray]
    centre: tuple[float, float] | None = None
    colour: tuple[int, int, int] = (0, 0, 0)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# --------------------------------------------------------------------------------------------------- classes
# Each builder returns parts in drawing order (back to front), with a little shape variation per image. A named
# part's centre lies well inside its own shape (at least ~0.04 object sides from an edge, >= 1 px at 64 px and
# the smallest scale), so the pixel holding it is more than half covered and belongs to the mask.

def _face(rng):
    ax, ex, ey, er = _u(rng, 0.8, 0.95), _u(rng, 0.15, 0.2), _u(rng, -0.16, -0.08), _u(rng, 0.075, 0.095)
    ny, mw, my = _u(rng, 0.02, 0.08), _u(rng, 0.22, 0.36), _u(rng, 0.25, 0.3)
    nose = _poly((0, ny - 0.09), (-0.075, ny + 0.07), (0.075, ny + 0.07))
    return [
        _Part("head", [_ellipse(0, 0, 0.5 * ax, 0.5)], (0.0, 0.0)),
        _Part("left_eye", [_circle(-ex, ey, er)], (-ex, ey)),
        _Part("right_eye", [_circle(ex, ey, er)], (ex, ey)),
        _Part("nose", [nose], _centroid(nose)),
        _Part("mouth", [_rect(0, my, mw, 0.09)], (0.0, my)),
    ]


def _car(rng):
    h, cab, wr = _u(rng, 0.26, 0.34), _u(rng, 0.25, 0.32), _u(rng, 0.12, 0.15)
    top = -0.08 - cab
    cabin = _poly((-0.32, -0.08), (-0.2, top), (0.12, top), (0.3, -0.08))
    window = _poly((-0.22, -0.12), (-0.15, top + 0.05), (0.08, top + 0.05), (0.2, -0.12))
    return [
        _Part("body", [_rect(0, -0.08 + h / 2, 1.0, h), cabin], (0.0, -0.08 + h / 2)),
        _Part("window", [window], _centroid(window)),
        _Part("back_wheel", [_circle(-0.3, h - 0.08, wr)], (-0.3, h - 0.08)),
        _Part("front_wheel", [_circle(0.3, h - 0.08, wr)], (0.3, h - 0.08)),
        _Part(None, [_circle(-0.3, h - 0.08, wr * 0.45), _circle(0.3, h - 0.08, wr * 0.45)]),
    ]


def _house(rng):
    w, roof, door_x, win_x = _u(rng, 0.62, 0.78), _u(rng, 0.3, 0.4), _u(rng, -0.2, -0.1), _u(rng, 0.1, 0.17)
    top = 0.5 - 0.58
    roof_poly = _poly((-w / 2 - 0.1, top), (w / 2 + 0.1, top), (0, top - roof))
    return [
        _Part(None, [_rect(w / 4, top - roof * 0.45, 0.09, roof * 0.6)]),  # chimney
        _Part("wall", [_rect(0, top + 0.29, w, 0.58)], (0.0, top + 0.29)),
        _Part("roof", [roof_poly], _centroid(roof_poly)),
        _Part("door", [_rect(door_x, 0.5 - 0.14, 0.16, 0.28)], (door_x, 0.5 - 0.14)),
        _Part("window", [_rect(win_x, top + 0.2, 0.17, 0.17)], (win_x, top + 0.2)),
    ]


def _flower(rng):
    by, n_pet, rot = _u(rng, -0.25, -0.18), int(rng.integers(5, 8)), _u(rng, 0, 360)
    petals = []
    for k in range(n_pet):
        a = math.radians(rot + 360.0 * k / n_pet)
        petals.append(_ellipse(0.18 * math.cos(a), by + 0.18 * math.sin(a), 0.12, 0.07, -math.degrees(a)))
    # the petals' centre is that of the first petal: a point of the ring, not the bloom under it
    a0 = math.radians(rot)
    leaf_y = _u(rng, 0.15, 0.3)
    return [
        _Part("stem", [_bar(0, by, 0, 0.5, 0.09)], (0.0, 0.35)),
        _Part("leaf", [_ellipse(0.13, leaf_y, 0.13, 0.06, -30)], (0.13, leaf_y)),
        _Part("petals", petals, (0.18 * math.cos(a0), by + 0.18 * math.sin(a0))),
        _Part("bloom", [_circle(0, by, 0.1)], (0.0, by)),
    ]


def _clock(rng):
    r, hour, minute = _u(rng, 0.38, 0.43), _u(rng, 0, 360), _u(rng, 0, 360)
    cy = 0.5 - r - 0.06
    ticks = [_rect((r - 0.07) * math.cos(math.radians(a)), cy + (r - 0.07) * math.sin(math.radians(a)),
                   0.06, 0.06) for a in (0, 90, 180, 270)]

    def hand(angle, length, w):
        a = math.radians(angle)
        tip = (length * math.sin(a), cy - length * math.cos(a))
        return _bar(0, cy, tip[0], tip[1], w), (tip[0] / 2, (cy + tip[1]) / 2)

    hour_poly, hour_c = hand(hour, r * 0.5, 0.08)
    min_poly, min_c = hand(minute, r * 0.8, 0.06)
    return [
        _Part("left_bell", [_circle(-0.27, cy - r + 0.02, 0.13)], (-0.29, cy - r - 0.02)),
        _Part("right_bell", [_circle(0.27, cy - r + 0.02, 0.13)], (0.29, cy - r - 0.02)),
        _Part(None, [_bar(-0.2, cy + r - 0.1, -0.3, 0.5, 0.07), _bar(0.2, cy + r - 0.1, 0.3, 0.5, 0.07)]),
        _Part("dial", [_circle(0, cy, r)], (0.0, cy)),
        _Part(None, ticks),
        _Part("hour_hand", [hour_poly], hour_c),
        _Part("minute_hand", [min_poly], min_c),
    ]


def _bicycle(rng):
    wr, wy = _u(rng, 0.18, 0.22), _u(rng, 0.12, 0.18)
    bx, tx, sx, ty = -0.04, 0.24, -0.14, wy - _u(rng, 0.3, 0.38)
    w = 0.075
    # a disc where three tubes meet: the frame's centre must be covered on every side
    frame = [_circle(bx, wy, 0.06), _bar(-0.3, wy, bx, wy, w), _bar(bx, wy, sx, ty, w), _bar(sx, ty, tx, ty, w),
             _bar(bx, wy, tx, ty, w),
             _bar(-0.3, wy, sx, ty, w), _bar(tx, ty, 0.3, wy, w)]
    return [
        _Part("back_wheel", [_circle(-0.3, wy, wr)], (-0.3, wy)),
        _Part("front_wheel", [_circle(0.3, wy, wr)], (0.3, wy)),
        _Part(None, [_circle(-0.3, wy, wr * 0.65), _circle(0.3, wy, wr * 0.65)]),
        _Part("frame", frame, (bx, wy)),
        _Part("seat", [_rect(sx - 0.02, ty - 0.06, 0.2, 0.08), _bar(sx, ty, sx, ty - 0.05, w)], (sx - 0.02, ty - 0.06)),
        _Part("handlebar", [_bar(tx, ty, tx, ty - 0.1, w), _bar(tx - 0.1, ty - 0.11, tx + 0.06, ty - 0.11, w)],
              (tx, ty - 0.1)),
    ]


def _fish(rng):
    bh, tail, fin = _u(rng, 0.17, 0.23), _u(rng, 0.16, 0.24), _u(rng, -0.1, 0.05)
    tail_poly = _poly((-0.24, 0), (-0.5, -tail), (-0.5, tail))
    fin_poly = _poly((fin - 0.12, -bh + 0.04), (fin + 0.14, -bh + 0.04), (fin - 0.12, -bh - 0.14))
    return [
        _Part("tail", [tail_poly], (-0.4, 0.0)),
        _Part("fin", [fin_poly], _centroid(fin_poly)),
        _Part(None, [_poly((-0.02, bh - 0.04), (0.12, bh - 0.04), (-0.04, bh + 0.09))]),
        _Part("body", [_ellipse(0.06, 0, 0.38, bh)], (0.0, 0.0)),
        _Part("eye", [_circle(0.27, -bh * 0.3, 0.065)], (0.27, -bh * 0.3)),
    ]


def _tree(rng):
    cr, tw, n_fruit = _u(rng, 0.26, 0.32), _u(rng, 0.13, 0.18), int(rng.integers(0, 4))
    fruits = [_circle(_u(rng, -0.25, 0.25), _u(rng, -0.3, 0.05), 0.045) for _ in range(n_fruit)]
    return [
        _Part("trunk", [_rect(0, 0.3, tw, 0.4)], (0.0, 0.35)),
        _Part("crown", [_circle(0, -0.2, cr), _circle(-0.2, -0.02, 0.2), _circle(0.2, -0.02, 0.2)], (0.0, -0.15)),
        *([_Part(None, fruits)] if fruits else []),
    ]


def _rocket(rng):
    bw, wy = _u(rng, 0.22, 0.28), _u(rng, -0.1, 0.0)
    cone = _poly((-bw / 2, -0.25), (bw / 2, -0.25), (0, -0.5))
    lf = _poly((-bw / 2, 0.08), (-bw / 2, 0.35), (-bw / 2 - 0.17, 0.4))
    rf = _poly((bw / 2, 0.08), (bw / 2, 0.35), (bw / 2 + 0.17, 0.4))
    flame = _poly((-0.09, 0.33), (0.09, 0.33), (0, 0.52))
    return [
        _Part("flame", [flame], (0.0, 0.39)),
        _Part("body", [_rect(0, 0.05, bw, 0.6)], (0.0, 0.1)),
        _Part("nose_cone", [cone], _centroid(cone)),
        _Part("left_fin", [lf], _centroid(lf)),
        _Part("right_fin", [rf], _centroid(rf)),
        _Part("window", [_circle(0, wy, 0.075)], (0.0, wy)),
    ]


def _robot(rng):
    hw, bw, arm = _u(rng, 0.28, 0.34), _u(rng, 0.38, 0.46), _u(rng, -20, 20)
    a0 = (bw / 2 + 0.02, -0.0)
    ax, ay = math.sin(math.radians(35 + arm)) * 0.24, math.cos(math.radians(35 + arm)) * 0.24
    return [
        _Part(None, [_bar(0, -0.3, 0, -0.42, 0.04), _circle(0, -0.44, 0.045),
                     _rect(-0.1, 0.42, 0.1, 0.16), _rect(0.1, 0.42, 0.1, 0.16), _rect(0, -0.06, 0.1, 0.06)]),
        _Part("left_arm", [_bar(-a0[0], a0[1], -a0[0] - ax, a0[1] + ay, 0.09)], (-a0[0] - ax / 2, a0[1] + ay / 2)),
        _Part("right_arm", [_bar(a0[0], a0[1], a0[0] + ax, a0[1] + ay, 0.09)], (a0[0] + ax / 2, a0[1] + ay / 2)),
        _Part("torso", [_rect(0, 0.17, bw, 0.36)], (0.0, 0.17)),
        _Part("head", [_rect(0, -0.19, hw, 0.22)], (0.0, -0.14)),
        _Part("left_eye", [_circle(-0.075, -0.22, 0.055)], (-0.075, -0.22)),
        _Part("right_eye", [_circle(0.075, -0.22, 0.055)], (0.075, -0.22)),
    ]


def _boat(rng):
    sail_w, top = _u(rng, 0.3, 0.4), _u(rng, -0.42, -0.34)
    sail = _poly((0.04, top), (0.04, 0.15), (0.04 + sail_w, 0.15))
    hull = _poly((-0.5, 0.2), (0.5, 0.2), (0.33, 0.42), (-0.33, 0.42))
    return [
        _Part("mast", [_bar(0, 0.2, 0, top - 0.06, 0.07)], (0.0, 0.0)),
        _Part("sail", [sail], _centroid(sail)),
        _Part(None, [_poly((-0.04, top + 0.1), (-0.04, 0.15), (-0.04 - sail_w * 0.7, 0.15))]),
        _Part("flag", [_rect(-0.085, top - 0.02, 0.17, 0.12)], (-0.085, top - 0.02)),
        _Part("hull", [hull], (0.0, 0.31)),
    ]


def _butterfly(rng):
    uw, lw = _u(rng, 0.19, 0.24), _u(rng, 0.12, 0.16)
    wings = {}
    for side, sx in (("left", -1), ("right", 1)):
        wings[side] = [_ellipse(sx * 0.22, -0.13, uw, 0.16, sx * 30), _ellipse(sx * 0.17, 0.17, lw, 0.12, -sx * 30)]
    return [
        _Part(None, [_bar(0, -0.2, -0.15, -0.45, 0.035), _bar(0, -0.2, 0.15, -0.45, 0.035)]),
        _Part("left_wing", wings["left"], (-0.22, -0.13)),
        _Part("right_wing", wings["right"], (0.22, -0.13)),
        _Part(None, [_circle(-0.22, -0.13, 0.06), _circle(0.22, -0.13, 0.06)]),
        _Part("thorax", [_ellipse(0, 0.02, 0.055, 0.3)], (0.0, 0.02)),
    ]


_BUILDERS = {
    "face": _face, "car": _car, "house": _house, "flower": _flower, "clock": _clock, "bicycle": _bicycle,
    "fish": _fish, "tree": _tree, "rocket": _rocket, "robot": _robot, "boat": _boat, "butterfly": _butterfly,
}

CLASSES: list[str] = list(_BUILDERS)


def _all_parts() -> list[str]:
    rng = np.random.default_rng(0)
    names: list[str] = []
    for build in _BUILDERS.values():
        for p in build(rng):
            if p.name is not None and p.name not in names:
                names.append(p.name)
    return names


PARTS: list[str] = _all_parts()
_PART_INDEX = {name: k for k, name in enumerate(PARTS)}


# --------------------------------------------------------------------------------------------------- scenes

def _colour(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float = 90.0) -> np.ndarray:
    """A palette colour (the same for every class and part) far enough from ``avoid`` to be seen."""
    best, best_d = None, -1.0
    for _ in range(12):
        h, s, v = rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0)
        c = _hsv_to_rgb(h, s, v)
        d = min((math.dist(c, a) for a in avoid), default=1e9)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.round(np.array(rgb) * 255.0)


_DISTRACTOR_KINDS = ["disc", "rectangle", "triangle", "bar", "plus", "star"]
_DISTRACTORS = [
    _circle(0, 0, 0.5), _rect(0, 0, 1.0, 1.0), _poly((0, -0.55), (0.5, 0.35), (-0.5, 0.35)), _rect(0, 0, 1.0, 0.25),
    _poly((-0.12, -0.5), (0.12, -0.5), (0.12, -0.12), (0.5, -0.12), (0.5, 0.12), (0.12, 0.12), (0.12, 0.5),
          (-0.12, 0.5), (-0.12, 0.12), (-0.5, 0.12), (-0.5, -0.12), (-0.12, -0.12)),  # plus sign
    np.array([[0.5 * (1 if k % 2 == 0 else 0.45) * math.cos(math.pi * k / 5 - math.pi / 2),
               0.5 * (1 if k % 2 == 0 else 0.45) * math.sin(math.pi * k / 5 - math.pi / 2)] for k in range(10)]),
]


@dataclass
class _Pose:
    cx: float  # object centre, in image sides
    cy: float
    scale: float  # multiplies BASE_SIZE
    rotation: float  # degrees, counter-clockwise on screen
    flip: bool


@dataclass
class _Scene:
    label: int
    parts: list[_Part]
    pose: _Pose
    background: dict
    distractors: list[tuple[np.ndarray, tuple[int, int, int]]] = field(default_factory=list)
    noise_rng_state: dict | None = None


def _object_matrix(pose: _Pose) -> np.ndarray:
    """2x2 map from the canonical frame to image sides: flip, then scale, then rotate."""
    a = math.radians(pose.rotation)
    c, s = math.cos(a), math.sin(a)
    k = BASE_SIZE * pose.scale
    f = -1.0 if pose.flip else 1.0
    # on screen (y down) a counter-clockwise turn maps (x, y) to (x c + y s, -x s + y c)
    return k * np.array([[c * f, s], [-s * f, c]])


FIXED_PARTS: dict[str, tuple[int, int, int]] = {
    "left_eye": (20, 20, 28), "right_eye": (20, 20, 28), "eye": (20, 20, 28), "nose": (150, 45, 40),
    "nose_cone": (150, 45, 40),
}
"""The one colour of each corresponding part in ``synthetic-parts``: eyes near black, noses a dark red."""


def _sample_scene(seed: int, split_id: int, index: int, fixed_parts: bool = False) -> _Scene:
    rng = np.random.default_rng([seed, split_id, index])
    label = index % len(CLASSES)

    bg = {
        "c1": _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)),
        "c2": _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)),
        "angle": rng.uniform(0, 2 * np.pi),
        "noise1": rng.normal(0, 22, size=(6, 6, 3)),
        "noise2": rng.normal(0, 10, size=(14, 14, 3)),
        "stripes": (rng.uniform(3, 9), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(8, 22))
        if rng.random() < 0.4 else None,
    }
    bg_mean = (bg["c1"] + bg["c2"]) / 2

    distractors = []
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(len(_DISTRACTORS)))
        pts = _rot(_DISTRACTORS[k] * _u(rng, 0.05, 0.11), _u(rng, 0, 360)) + rng.uniform(0.0, 1.0, size=2)
        distractors.append((_tag(np.asarray(pts), _DISTRACTOR_KINDS[k]),
                            tuple(int(v) for v in _colour(rng, [bg_mean], 60.0))))

    parts = _BUILDERS[CLASSES[label]](rng)
    used = [bg_mean]
    for p in parts:
        p.colour = tuple(int(v) for v in _colour(rng, used))
        used.append(np.array(p.colour, dtype=float))
        if fixed_parts and p.name in FIXED_PARTS:  # after the draw, so every other draw (and pose) stays the same
            p.colour = FIXED_PARTS[p.name]

    pose = _Pose(0.5, 0.5, _u(rng, *SCALE_RANGE), _u(rng, -ROTATION_RANGE, ROTATION_RANGE), bool(rng.random() < 0.5))
    pts = np.concatenate([poly for p in parts for poly in p.polys]) @ _object_matrix(pose).T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = []
    for k in range(2):
        a, b = MARGIN - lo[k], 1.0 - MARGIN - hi[k]
        centre.append(_u(rng, a, b) if b > a else 0.5 * (a + b))
    pose.cx, pose.cy = centre
    scene = _Scene(label, parts, pose, bg, distractors)
    # the pixel noise is drawn last, from the generator's state here, so its size cannot shift the scene's draws
    scene.noise_rng_state = rng.bit_generator.state
    return scene


@lru_cache(maxsize=16)
def _upsample_index(size: int, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour nodes and weights that sample a smooth interpolation of grid nodes at pixel centres."""
    u = (np.arange(size) + 0.5) / size * (grid - 1)
    i0 = np.clip(np.floor(u).astype(int), 0, grid - 2)
    t = u - i0
    t = (t * t * (3 - 2 * t)).astype(np.float32)
    return i0, i0 + 1, t


def _upsample(nodes: np.ndarray, size: int) -> np.ndarray:
    # gathers and blends, not a matrix product: BLAS results may differ in the last bit between machines
    i0, i1, t = _upsample_index(size, nodes.shape[0])
    nodes = nodes.astype(np.float32)
    tx = t[None, :, None]
    rows = nodes[:, i0] * (1 - tx) + nodes[:, i1] * tx
    ty = t[:, None, None]
    return rows[i0] * (1 - ty) + rows[i1] * ty


@lru_cache(maxsize=16)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    u = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    return u[None, :], u[:, None]


def _background(bg: dict, size: int) -> np.ndarray:
    x, y = _coords(size)
    ca, sa = math.cos(bg["angle"]), math.sin(bg["angle"])
    t = np.clip(((x - 0.5) * ca + (y - 0.5) * sa) * 1.2 + 0.5, 0.0, 1.0)[..., None]
    c1, c2 = bg["c1"].astype(np.float32), bg["c2"].astype(np.float32)
    img = c1 + (c2 - c1) * t
    img = img + _upsample(bg["noise1"], size) + _upsample(bg["noise2"], size)
    if bg["stripes"] is not None:
        freq, ang, phase, amp = bg["stripes"]
        img = img + (amp * np.sin(2 * np.pi * freq * (x * math.cos(ang) + y * math.sin(ang)) + phase))[..., None]
    return img


def _to_canvas(pts: np.ndarray, canvas: int) -> list[float]:
    # Pillow puts integer coordinates at pixel centres; ours put them at pixel corners, hence the half pixel
    p = np.round((pts * canvas - 0.5) / _ROUND) * _ROUND
    return p.ravel().tolist()


def _render(scene: _Scene, size: int, pose: _Pose | None = None, concepts: bool = False):
    """Image (H, W, 3) uint8, mask (H, W) bool, part centres (len(PARTS), 2) float (NaN where absent); with
    ``concepts``, also the concept maps (len(CONCEPTS), H, W) uint8 of :func:`concept_maps`, drawn beside the
    image (the image's pixels are the same either way)."""
    pose = pose or scene.pose
    canvas = size * SUPERSAMPLE
    # the smooth background needs no supersampling: nearest upscaling, then the box reduction, gives it back
    bg = np.clip(_background(scene.background, size), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB").resize((canvas, canvas), Image.NEAREST)
    mask = Image.new("L", (canvas, canvas), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    labels = {k: Image.new("L", (canvas, canvas), 0) for k in ("part", "shape")} if concepts else {}
    ldraw = {k: ImageDraw.Draw(v) for k, v in labels.items()}
    for pts, colour in scene.distractors:
        draw.polygon(_to_canvas(pts, canvas), fill=colour)
        if concepts:
            ldraw["shape"].polygon(_to_canvas(pts, canvas), fill=SHAPES.index(pts.kind) + 1)
    m = _object_matrix(pose).T
    t = np.array([pose.cx, pose.cy])
    centres = np.full((len(PARTS), 2), np.nan)
    for part in scene.parts:
        name = part.name
        if name is not None and pose.flip and name.startswith(("left_", "right_")):
            name = ("right_" + name[5:]) if name.startswith("left_") else ("left_" + name[6:])
        for poly in part.polys:
            xy = _to_canvas(poly @ m + t, canvas)
            draw.polygon(xy, fill=part.colour)
            mdraw.polygon(xy, fill=255)
            if concepts:
                ldraw["shape"].polygon(xy, fill=SHAPES.index(poly.kind) + 1)
                if name is not None:  # a part without a name leaves the named part under it showing
                    ldraw["part"].polygon(xy, fill=_PART_INDEX[name] + 1)
        if name is not None:
            centres[_PART_INDEX[name]] = (np.array(part.centre) @ m + t) * size
    image = np.asarray(img.reduce(SUPERSAMPLE)).copy()
    obj = np.asarray(mask.reduce(SUPERSAMPLE)) >= 128
    rng = np.random.default_rng(0)
    rng.bit_generator.state = scene.noise_rng_state
    noise = rng.integers(-4, 5, size=image.shape, dtype=np.int16)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    if not concepts:
        return image, obj, centres
    part, shape = (_mode(np.asarray(labels[k])) for k in ("part", "shape"))
    texture = np.where(obj | (shape > 0), 0, 1 if scene.background["stripes"] is not None else 2)
    maps = np.stack([np.where(obj, scene.label + 1, 0), part * obj, shape, colour_names(image), texture])
    return image, obj, centres, maps.astype(np.uint8)


def _mode(labels: np.ndarray) -> np.ndarray:
    """A supersampled label map reduced to the image: each pixel's most common label (ties: the first drawn of
    its four samples, row by row)."""
    h, w = labels.shape[0] // SUPERSAMPLE, labels.shape[1] // SUPERSAMPLE
    samples = labels.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).transpose(0, 2, 1, 3).reshape(h, w, -1)
    counts = (samples[..., :, None] == samples[..., None, :]).sum(-1)
    return np.take_along_axis(samples, counts.argmax(-1)[..., None], -1)[..., 0]


COLOURS = {"black": (0, 0, 0), "blue": (0, 0, 255), "brown": (139, 69, 19), "grey": (128, 128, 128),
           "green": (0, 128, 0), "orange": (255, 165, 0), "pink": (255, 192, 203), "purple": (128, 0, 128),
           "red": (255, 0, 0), "white": (255, 255, 255), "yellow": (255, 255, 0)}
"""Broden's eleven colour names, each at a typical sRGB value."""


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in 0..255 to CIE Lab (D65)."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_COLOUR_LAB = _lab(np.array(list(COLOURS.values())))


def colour_names(image: np.ndarray) -> np.ndarray:
    """Each pixel of an (H, W, 3) uint8 image named by the nearest of :data:`COLOURS` in CIE Lab: 1 + its index."""
    d = ((_lab(image)[..., None, :] - _COLOUR_LAB) ** 2).sum(-1)
    return (d.argmin(-1) + 1).astype(np.uint8)


def _box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.full(4, np.nan, dtype=np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


# --------------------------------------------------------------------------------------------------- public API

def _check(split: str, size: int, seed: int, classes: list[str] | None) -> tuple[int, list[str]]:
    if split not in SPLITS:
        raise unknown("split", split, list(SPLITS))
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ConvscopeError(f"size must be an integer of at least 8 pixels, got {size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConvscopeError(f"seed must be a non-negative integer, got {seed!r}")
    if classes is None:
        return SPLITS[split], list(CLASSES)
    if isinstance(classes, str):
        classes = [classes]
    classes = list(classes)
    for c in classes:
        if c not in CLASSES:
            raise unknown("class", c, CLASSES)
    if not classes or len(set(classes)) != len(classes):
        raise ConvscopeError(f"classes must be distinct names from {', '.join(CLASSES)}, got {classes}")
    return SPLITS[split], classes


def _full_index(index: int, classes: list[str]) -> int:
    """Index in the full set of image ``index`` of the set restricted to ``classes`` (see the module doc)."""
    k = len(classes)
    return (index // k) * len(CLASSES) + CLASSES.index(classes[index % k])


def _generate(split_id: int, n: int, size: int, seed: int, classes: list[str], fixed_parts: bool = False
              ) -> dict[str, np.ndarray]:
    check_memory(n, size, "the synthetic data set")
    images = np.empty((n, 3, size, size), np.uint8)
    masks = np.empty((n, size, size), bool)
    boxes = np.empty((n, 4), np.float32)
    parts = np.empty((n, len(PARTS), 2), np.float32)
    labels = np.arange(n, dtype=np.int64) % len(classes)
    for i in range(n):
        scene = _sample_scene(seed, split_id, _full_index(i, classes), fixed_parts)
        image, mask, centres = _render(scene, size)
        images[i] = image.transpose(2, 0, 1)
        masks[i], boxes[i], parts[i] = mask, _box(mask), centres
    return {"images": images, "labels": labels, "masks": masks, "boxes": boxes, "parts": parts}


def _scenes(split_id: int, n: int, seed: int, classes: list[str], fixed_parts: bool) -> torch.Tensor:
    """Which scene each image of a set is: (seed, split id, index in the full set, fixed parts), (n, 4) int64."""
    return torch.tensor([(seed, split_id, _full_index(i, classes), int(fixed_parts)) for i in range(n)],
                        dtype=torch.long).reshape(n, 4)


def _truth(boxes, masks, parts, scenes: torch.Tensor | None = None) -> GroundTruth:
    return GroundTruth(torch.from_numpy(np.ascontiguousarray(boxes)), torch.from_numpy(np.ascontiguousarray(masks)),
                       {name: torch.from_numpy(np.ascontiguousarray(parts[:, k])) for k, name in enumerate(PARTS)},
                       scenes)


def render_without(scene: tuple[int, int, int, int], size: int, category: str, name: str) -> np.ndarray | None:
    """Scene ``scene`` (a row of ``truth.scenes``) rendered again without a concept, everything else as it was
    (background, distractors, colours, pose, pixel noise): the object (``category`` ``"object"``), one named
    part, or every polygon of one shape. (H, W, 3) uint8; None for the categories a scene cannot be drawn
    without (colour, texture: their pixels are painted instead) or where the scene has nothing of the concept."""
    seed, split_id, index, fixed = (int(v) for v in scene)
    s = _sample_scene(seed, split_id, index, bool(fixed))
    flip = s.pose.flip

    def shown(part_name):  # the name the concept maps give the part (left and right as the viewer sees them)
        if part_name is not None and flip and part_name.startswith(("left_", "right_")):
            return ("right_" + part_name[5:]) if part_name.startswith("left_") else ("left_" + part_name[6:])
        return part_name

    if category == "object" and CLASSES[s.label] == name:
        s.parts = []
    elif category == "part" and any(shown(p.name) == name for p in s.parts):
        s.parts = [p for p in s.parts if shown(p.name) != name]
    elif category == "shape":
        before = sum(len(p.polys) for p in s.parts) + len(s.distractors)
        s.parts = [_Part(p.name, [q for q in p.polys if getattr(q, "kind", None) != name], p.centre, p.colour)
                   for p in s.parts]
        s.distractors = [d for d in s.distractors if getattr(d[0], "kind", None) != name]
        if sum(len(p.polys) for p in s.parts) + len(s.distractors) == before:
            return None
    else:
        return None
    return _render(s, size)[0]


TEXTURES = ["stripes", "noise"]
"""The backgrounds' textures: stripes over smooth noise, or the smooth noise alone."""

CONCEPTS: dict[str, list[str]] = {"object": CLASSES, "part": PARTS, "shape": SHAPES, "colour": list(COLOURS),
                                  "texture": TEXTURES}
"""The concept categories of the dissection (Broden's five) and the names in each; :func:`concept_maps` gives
one map per category, 0 where no concept of it is, else 1 + the concept's index."""

CONCEPTS_VERSION = 1
"""Bump whenever a change alters any concept map: it is part of the concept maps' cache key."""


def concept_maps(scenes: torch.Tensor, size: int, cache: bool = True) -> torch.Tensor:
    """The concept maps of the scenes ``scenes`` (a set's ``truth.scenes``) at ``size`` px, (N, 5, size, size)
    uint8 in the order of :data:`CONCEPTS`: the object (its class), the visible named part, the shape (the
    object's and the distractors'), the colour name of each pixel, and the background's texture. Rendered, not
    annotated: the same drawing as the images, whose pixels it does not change. Cached like the images."""
    scenes = torch.as_tensor(scenes, dtype=torch.long).reshape(-1, 4)
    key = {"version": CONCEPTS_VERSION, "generator": GENERATOR_VERSION, "size": size, "concepts": CONCEPTS,
           "scenes": hashlib.sha256(scenes.numpy().tobytes()).hexdigest()}
    path = cache_dir() / ("concepts-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
                          + f"-{len(scenes)}-{size}px.npz")
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                maps = f["maps"]
            if maps.shape == (len(scenes), len(CONCEPTS), size, size):
                return torch.from_numpy(maps)
        except Exception as e:  # a lost cache: render again
            warnings.warn(f"concept map cache {path} is unreadable ({e}); rendering it again", stacklevel=2)
    check_memory(len(scenes), size, "the concept maps")
    maps = np.empty((len(scenes), len(CONCEPTS), size, size), np.uint8)
    for i, (seed, split_id, index, fixed) in enumerate(scenes.tolist()):
        maps[i] = _render(_sample_scene(seed, split_id, index, bool(fixed)), size, concepts=True)[3]
    if cache:
        try:
            save_npz(path, maps=maps)
        except OSError as e:
            warnings.warn(f"could not write the concept map cache {path} ({e})", stacklevel=2)
    return torch.from_numpy(maps)


def cache_dir() -> Path:
    """Where generated sets are cached: ``$CONVSCOPE_CACHE`` or ``~/.cache/convscope``."""
    return Path(os.environ.get("CONVSCOPE_CACHE") or Path.home() / ".cache" / "convscope")


def cache_path(split: str = "train", n: int | None = None, size: int = 64, seed: int = 0,
               classes: list[str] | None = None, fixed_parts: bool = False) -> Path:
    """The cache file of a set: named by a hash of every parameter and :data:`GENERATOR_VERSION`."""
    _, classes = _check(split, size, seed, classes)
    n = DEFAULT_N[split] if n is None else n
    key = {"version": GENERATOR_VERSION, "split": split, "n": n, "size": size, "seed": seed, "classes": classes,
           "all": CLASSES, "parts": PARTS}
    if fixed_parts:  # only then, so that the default set's files keep their names
        key["fixed_parts"] = FIXED_PARTS
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{_name(fixed_parts)}-{split}-{n}-{size}px-{digest}.npz"


def _name(fixed_parts: bool) -> str:
    return "synthetic-parts" if fixed_parts else "synthetic"


_KEYS = ("images", "labels", "masks", "boxes", "parts")


def _read_cache(path: Path, n: int, size: int) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in _KEYS}
        data["masks"] = np.unpackbits(data["masks"], axis=-1, count=size).astype(bool)
        expected = {"images": (n, 3, size, size), "labels": (n,), "masks": (n, size, size), "boxes": (n, 4),
                    "parts": (n, len(PARTS), 2)}
        for k, shape in expected.items():
            if data[k].shape != shape:
                raise ValueError(f"{k} has shape {data[k].shape}, expected {shape}")
        return data
    except Exception as e:  # any unreadable file is only a lost cache: say so and render again
        warnings.warn(f"synthetic data cache {path} is unreadable ({e}); generating it again", stacklevel=3)
        return None


def load_synthetic(split: str = "train", n: int | None = None, size: int = 64, seed: int = 0,
                   classes: list[str] | None = None, cache: bool = True, fixed_parts: bool = False) -> ImageSet:
    """The embedded data set, split ``train`` / ``val`` / ``test`` (default sizes 10000 / 1000 / 2000).

    Returns an :class:`ImageSet` of uint8 images (n, 3, size, size) with ``truth``: boxes, masks and the centre
    of every part in :data:`PARTS` (NaN where the class lacks the part). Labels cycle through the classes.
    ``classes`` restricts the set to those classes, relabelled 0..k-1 in the given order (for the transfer
    experiment, paper Tables 4-5: pretrain on some classes, train a new softmax on the others); its images are
    a subset of the full set's. ``cache`` keeps the generated arrays in :func:`cache_path` (an unreadable file is
    regenerated with a warning; a cache that cannot be written is skipped with a warning). ``fixed_parts``: every
    eye and nose in one colour of its own (:data:`FIXED_PARTS`; the data set ``synthetic-parts``).
    """
    split_id, names = _check(split, size, seed, classes)
    n = DEFAULT_N[split] if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConvscopeError(f"n must be a non-negative integer, got {n!r}")
    data = None
    path = cache_path(split, n, size, seed, names, fixed_parts) if cache else None
    if path is not None:
        data = _read_cache(path, n, size)
    if data is None:
        data = _generate(split_id, n, size, seed, names, fixed_parts)
        if path is not None:

            try:
                save_npz(path, compress=False, **{**data, "masks": np.packbits(data["masks"], axis=-1)})
            except OSError as e:
                warnings.warn(f"could not write the synthetic data cache {path} ({e})", stacklevel=2)
    return ImageSet(torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]), names,
                    _truth(data["boxes"], data["masks"], data["parts"], _scenes(split_id, n, seed, names, fixed_parts)),
                    name=f"{_name(fixed_parts)}/{split}")


def render_pose(split: str, index: int, size: int = 64, seed: int = 0, dx: float = 0.0, dy: float = 0.0,
                scale: float = 1.0, rotation: float = 0.0, classes: list[str] | None = None,
                fixed_parts: bool = False) -> tuple[torch.Tensor, GroundTruth]:
    """Image ``index`` of a split re-rendered with its object moved, for the invariance experiment (paper Fig. 5).

    The pose is changed *relative to the sampled one*: ``dx``, ``dy`` pixels (at ``size``) are added to the
    object's centre, its size is multiplied by ``scale`` (about its centre), and ``rotation`` degrees are added
    (counter-clockwise on screen, about its centre); the flip is kept. Background, distractors, colours and
    pixel noise are unchanged, so nothing but the object moves and no border is exposed. With the identity
    pose the image equals ``load_synthetic(split, ...)[index]`` exactly. The object may leave the image: its
    mask is then clipped, part centres may lie outside ``[0, size)``, and an empty mask has a NaN box.

    Returns the uint8 image (3, size, size) and its :class:`GroundTruth` (one image: boxes (1, 4), ...).
    """
    split_id, names = _check(split, size, seed, classes)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ConvscopeError(f"index must be a non-negative integer, got {index!r}")
    scene = _sample_scene(seed, split_id, _full_index(index, names), fixed_parts)
    p = scene.pose
    pose = _Pose(p.cx + dx / size, p.cy + dy / size, p.scale * scale, p.rotation + rotation, p.flip)
    image, mask, centres = _render(scene, size, pose)
    truth = _truth(_box(mask)[None], mask[None], centres[None].astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), truth


_MARKERS = [(255, 255, 255), (255, 60, 60), (60, 255, 60), (80, 160, 255), (255, 255, 0), (255, 0, 255),
            (0, 255, 255), (255, 150, 0)]


def _short(name: str) -> str:
    words = name.split("_")
    return name[:3] if len(words) == 1 else "".join(w[0] for w in words)


def preview(dataset: ImageSet, n: int = 16, scale: int = 3) -> Image.Image:
    """A grid of the first ``n`` images with their ground truth drawn on: box, part centres with short labels
    (``le`` = left_eye, ``nos`` = nose, ...), and the class name under each. Returns the image; writes nothing.
    """
    from PIL import ImageFont

    n = max(0, min(n, len(dataset)))
    if n == 0:
        raise ConvscopeError("preview needs at least one image")
    side = dataset.image_size * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    label_h, gap = 14, 4
    grid = Image.new("RGB", (cols * (side + gap) + gap, rows * (side + label_h + gap) + gap), (32, 32, 32))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    truth = dataset.truth
    for k in range(n):
        x0, y0 = gap + (k % cols) * (side + gap), gap + (k // cols) * (side + label_h + gap)
        tile = Image.fromarray(dataset.images[k].permute(1, 2, 0).numpy()).resize((side, side), Image.NEAREST)
        grid.paste(tile, (x0, y0))
        if truth is not None:
            box = truth.boxes[k].tolist()
            if not any(math.isnan(v) for v in box):
                draw.rectangle([x0 + box[0] * scale, y0 + box[1] * scale, x0 + box[2] * scale - 1,
                                y0 + box[3] * scale - 1], outline=(255, 255, 0))
            j = 0
            for name, xy in truth.parts.items():
                px, py = xy[k].tolist()
                if math.isnan(px):
                    continue
                c = _MARKERS[j % len(_MARKERS)]
                j += 1
                cx, cy = x0 + px * scale, y0 + py * scale
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=c, outline=(0, 0, 0))
                draw.text((cx + 3, cy - 5), _short(name), fill=c, font=font)
        draw.text((x0, y0 + side + 1), dataset.classes[int(dataset.labels[k])], fill=(230, 230, 230), font=font)
    return grid


__all__ = ["CLASSES", "COLOURS", "CONCEPTS", "GENERATOR_VERSION", "PARTS", "SHAPES", "TEXTURES", "cache_dir",
           "cache_path", "colour_names", "concept_maps", "load_synthetic", "preview", "render_pose", "render_without"]
