"""The input box a unit sees: the image patch shown beside each projection in paper Fig. 2 (section 4).

One forward pass of a blank image (batch 1, no gradients) is traced (:mod:`convscope.positions`): every tensor
computed from the input, which tensors it came from, how its positions map back to theirs and which of its
dimensions hold them (channels-last tensors between two permutes included). The unit's box is then carried
back through that graph to the input, exactly:

- ``conv2d`` / ``conv_transpose2d`` / ``max_pool2d`` / ``avg_pool2d`` (any kernel, stride, padding, dilation,
  ``padding="same"``, ceil mode): output rows ``a..b`` come from input rows ``a*s - p .. b*s - p + d*(k-1)``,
  clipped to the input at every layer, since padding and the overhanging windows of ceil-mode pools hold no
  input;
- ``F.pad``: a shift by the leading padding;
- any other op that keeps the positions (ReLU, batch norm, LRN, dropout, additions of residual branches,
  concatenations along channels, permutes, a LayerNorm or Linear over a channels-last tensor's channels): the
  same box. Where several branches meet, boxes are united;
- a gate (squeeze-and-excitation's channel weights, group norm's statistics): the unit depends on the whole
  image through it, but the box is the convolutional path's, the part of the image the unit's own pattern
  lies in. :func:`geometry` says which layers have a gate;
- an op that changes the positions otherwise (flatten, linear layers over positions, adaptive or global
  pooling, interpolation): the whole input of that op, a safe over-estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConvscopeError
from .forward import eval_mode, input_channels, run_to_all
from .layers import census, feature_layers, paper_names, site
from .positions import Node, Tracer, pair


@dataclass(frozen=True)
class Box:
    """An input box, rows ``y0:y1`` and columns ``x0:x1`` (end exclusive), clipped to the image."""

    y0: int
    x0: int
    y1: int
    x1: int

    def __iter__(self):
        return iter((self.y0, self.x0, self.y1, self.x1))

    @property
    def slices(self) -> tuple[slice, slice]:
        """``image[..., box.slices[0], box.slices[1]]`` crops the patch."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


Span = tuple[int, int, int, int]  # rows r0..r1, columns c0..c1, inclusive; None means the whole tensor


def _back(span: Span, window, size: tuple[int, int], clip: bool = True) -> Span:
    """Carry a span of output positions back through a convolution's or a pool's window to the input positions it
    depends on (``clip``: those inside the input; else where the arithmetic puts them, past the border too)."""
    out = []
    for dim in range(2):
        a, b = span[2 * dim], span[2 * dim + 1]
        k, s, p, d = (g[dim] for g in window[:4])
        if window[4]:  # transposed: input i reaches outputs i*s - p + j*d, j < k
            lo, hi = -((-(a + p - d * (k - 1))) // s), (b + p) // s
        else:
            lo, hi = a * s - p, b * s - p + d * (k - 1)
        out += [max(lo, 0), min(hi, size[dim] - 1)] if clip else [lo, hi]
    return tuple(out)


def receptive_field(
    model: nn.Module,
    layer: str,
    position: tuple[int, int] | Sequence[tuple[int, int]] | None,
    input_size: int | tuple[int, int] | None = None,
) -> Box | list[Box]:
    """The exact input box of unit ``position`` (row, col) of ``layer`` (paper Fig. 2's image patches), along the
    convolutional path (a gate such as squeeze-and-excitation is not followed: see :func:`geometry`).

    ``position`` may also be a list of positions (one traced forward pass for all: a list of boxes), or None
    for a fully connected layer (the whole image). ``input_size`` (an int or (height, width)) defaults to
    ``model.input_size``. The box is end-exclusive and clipped to the image.
    """
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None:
        raise ConvscopeError("the model has no input_size attribute: pass input_size=(height, width)")
    tracer, (out,) = _traced(model, [site(model, layer)], pair(size, None))
    target = tracer.node(out)
    if target is None:
        raise ConvscopeError(f"layer {layer!r} does not depend on the input")
    single = position is None or not isinstance(position[0], (tuple, list))
    positions = [position] if single else list(position)
    boxes = [_box(tracer, target, p, layer) for p in positions]
    return boxes[0] if single else boxes


def geometry(model: nn.Module, layers: Sequence[str], input_size: int | tuple[int, int]
             ) -> dict[str, tuple[int, int, bool] | None]:
    """For each layer with positions (maps, channels-last tensors too): the side of a unit's receptive field as the
    image border does not clip it (the windows' arithmetic carried on past the border: the field in an image as
    large as it needs), the step in pixels between neighbouring units, and whether the unit also depends on the
    whole image through a gate (squeeze-and-excitation, group norm); None for a layer without positions. A unit
    that depends on the whole image otherwise has the image's side as its field."""
    tracer, outs = _traced(model, [site(model, layer) for layer in layers], pair(input_size, None))
    found: dict[str, tuple[int, int, bool] | None] = dict.fromkeys(layers)
    for layer, out in zip(layers, outs):
        node = tracer.node(out)
        if node is None or not node.axes:
            continue
        rows, cols = node.size
        r, c = rows // 2, cols // 2
        span, gated = _span(tracer, node, (r, c), layer, clip=False)
        if span is None:  # the whole image, at every position
            found[layer] = (max(tracer.size), None, gated)
            continue
        step = _span(tracer, node, (r, c + 1), layer, clip=False)[0][2] - span[2]  # past the map's edge if need be
        found[layer] = (max(span[1] - span[0], span[3] - span[2]) + 1, step, gated)
    return found


@dataclass(frozen=True)
class LayerRow:
    """One module as ``convscope layers`` shows it: its output (``shape`` without the batch; None when it is not
    a tensor or never ran), how many times it ran, its receptive field and stride in pixels (tensors with
    positions), whether it also depends on the whole image through a gate, and what an analysis can probe there
    (``"maps"``, ``"vector"``, ``"channels last"`` (not probed), or ``""``)."""

    name: str
    kind: str
    alias: str | None
    shape: tuple[int, ...] | None
    calls: int
    field: int | None
    stride: int | None
    gated: bool
    probe: str
    default: bool


def layer_table(model: nn.Module, input_size: int, outputs: int | None = None) -> list[LayerRow]:
    """Every named module after one forward pass at ``input_size``: shape, calls, receptive field, stride, and
    whether an analysis uses it by default (``outputs``: the model's number of classes, to find its
    penultimate module; default read off a forward pass)."""

    infos = census(model, input_size)
    if outputs is None:
        outputs = census_outputs(model, input_size)
    shapes = geometry(model, [i.name for i in infos if i.calls >= 1 and i.shape is not None], input_size)
    aliases = {v: k for k, v in paper_names(model).items()}
    try:
        defaults = set(feature_layers(model, infos, outputs))
    except ConvscopeError:
        defaults = set()
    return [LayerRow(i.name, i.kind, aliases.get(i.name), i.shape[1:] if i.shape else None, i.calls,
                     *(shapes.get(i.name) or (None, None, False)), i.probe,
                     i.name in defaults or aliases.get(i.name) in defaults) for i in infos]


def census_outputs(model: nn.Module, input_size: int) -> int:
    """How many outputs (classes) the model gives for one blank image."""
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    with torch.no_grad(), eval_mode(model):
        return int(model(torch.zeros(1, input_channels(model) or 3, input_size, input_size, **like)).shape[-1])


def _traced(model: nn.Module, sites: list, size: tuple[int, int]) -> tuple[Tracer, list[torch.Tensor]]:
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    x = torch.zeros(1, input_channels(model) or 3, *size, **like)
    tracer = Tracer(x)
    with torch.no_grad(), eval_mode(model):
        return tracer, run_to_all(model, sites, x, tracer)


def _box(tracer: Tracer, target: Node, position, layer: str) -> Box:
    """The box of one unit of ``target`` along the convolutional path, clipped to the image."""
    span = _span(tracer, target, position, layer)[0]
    return Box(0, 0, *tracer.size) if span is None else Box(span[0], span[2], span[1] + 1, span[3] + 1)


def _span(tracer: Tracer, target: Node, position, layer: str, clip: bool = True) -> tuple[Span | None, bool]:
    """The input rows and columns one unit of ``target`` depends on along the convolutional path (``clip``: inside
    the image; else where the arithmetic puts them, for a position past the map's edge too; None: the whole
    image), and whether a gate reaches it."""
    if position is None or not target.axes:
        if position is not None:
            raise ConvscopeError(f"layer {layer!r} has no spatial positions: pass position=None")
        span = None
    else:
        r, c = (int(v) for v in position)
        oh, ow = target.size
        if clip and not (0 <= r < oh and 0 <= c < ow):
            raise ConvscopeError(f"position {(r, c)} out of range: layer {layer!r} has {oh}x{ow} maps")
        span = (r, r, c, c)
    spans: dict[int, Span | None] = {target.index: span}
    pending = {target.index: target}
    gated = False
    while pending:  # newest first: every consumer of a node is newer than it, so its span is complete
        node = pending.pop(max(pending))
        span = spans[node.index]
        for parent, geometry in node.parents:
            if geometry == "gate":
                gated = True
                continue
            if span is None or geometry == "whole":
                new = None
            elif geometry == "same":
                new = span
            else:
                new = _back(span, geometry, parent.size, clip)
            if parent.index in spans:
                new = _union(spans[parent.index], new)
            spans[parent.index] = new
            pending[parent.index] = parent
    if 0 not in spans:  # reached through gates only
        return None, True
    return spans[0], gated


def _union(a: Span | None, b: Span | None) -> Span | None:
    if a is None or b is None:
        return None
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


__all__ = ["Box", "LayerRow", "geometry", "layer_table", "receptive_field"]
