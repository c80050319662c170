"""The input box a unit sees: the image patch shown beside each projection in paper Fig. 2 (section 4).

One forward pass of a blank image (batch 1, no gradients) is traced by a ``TorchFunctionMode`` that records,
for every tensor computed from the input, which tensors it came from and how its positions map back to theirs.
The unit's box is then carried back through that graph to the input, exactly:

- ``conv2d`` / ``conv_transpose2d`` / ``max_pool2d`` / ``avg_pool2d`` (any kernel, stride, padding, dilation,
  ``padding="same"``, ceil mode): output rows ``a..b`` come from input rows ``a*s - p .. b*s - p + d*(k-1)``,
  clipped to the input at every layer, since padding and the overhanging windows of ceil-mode pools hold no
  input;
- ``F.pad``: a shift by the leading padding;
- any other op that keeps the spatial size (ReLU, batch norm, LRN, dropout, additions of residual branches,
  concatenations along channels): the same box. Where several branches meet, boxes are united;
- an op that changes the spatial size otherwise (flatten, linear layers, adaptive or global pooling,
  interpolation): the whole input of that op, a safe over-estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvscopeError
from .forward import eval_mode, input_channels, run_to, run_to_all
from .layers import census, feature_layers, paper_names, site


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


# Positional argument names of the spatial ops whose geometry is known.
_ARGS = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose2d": (
        "input",
        "weight",
        "bias",
        "stride",
        "padding",
        "output_padding",
        "groups",
        "dilation",
    ),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor"),
    "pad": ("input", "pad", "mode", "value"),
}
_ARGS["max_pool2d_with_indices"] = _ARGS["max_pool2d"]

Span = tuple[int, int, int, int]  # rows r0..r1, columns c0..c1, inclusive; None means the whole tensor


def _pair(v, default) -> tuple[int, int]:
    if v is None or (isinstance(v, (tuple, list)) and len(v) == 0):
        v = default
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _geometry(name: str, args: tuple, kwargs: dict):
    """``(kernel, stride, padding, dilation, transposed)`` per spatial dimension, for a known spatial op."""
    bound = dict(zip(_ARGS[name], args))
    bound.update(kwargs)
    if name == "pad":
        pad = bound["pad"]
        return (1, 1), (1, 1), (pad[2] if len(pad) > 2 else 0, pad[0]), (1, 1), False
    if name.startswith("conv"):
        k = tuple(bound["weight"].shape[-2:])
        d = _pair(bound.get("dilation"), 1)
        p = bound.get("padding", 0)
        if p == "valid":
            p = (0, 0)
        elif p == "same":
            p = tuple((di * (ki - 1)) // 2 for ki, di in zip(k, d))
        return k, _pair(bound.get("stride"), 1), _pair(p, 0), d, name == "conv_transpose2d"
    k = _pair(bound["kernel_size"], None)
    return (
        k,
        _pair(bound.get("stride"), k),
        _pair(bound.get("padding"), 0),
        _pair(bound.get("dilation"), 1),
        False,
    )


def _back(span: Span, geometry, size: tuple[int, int]) -> Span:
    """Carry a span of output positions back to the input positions it depends on."""
    out = []
    for dim in range(2):
        a, b = span[2 * dim], span[2 * dim + 1]
        k, s, p, d = (g[dim] for g in geometry[:4])
        if geometry[4]:  # transposed: input i reaches outputs i*s - p + j*d, j < k
            lo, hi = -((-(a + p - d * (k - 1))) // s), (b + p) // s
        else:
            lo, hi = a * s - p, b * s - p + d * (k - 1)
        out += [max(lo, 0), min(hi, size[dim] - 1)]
    return tuple(out)


class _Node:
    __slots__ = ("index", "shape", "parents")

    def __init__(self, index: int, shape: torch.Size, parents: list):
        self.index, self.shape, self.parents = index, shape, parents


class _Tracer(TorchFunctionMode):
    """Record, for every tensor derived from the input, its parents and how its positions map to theirs."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.nodes: dict[int, tuple[torch.Tensor, _Node]] = {id(x): (x, _Node(0, x.shape, []))}
        self.count = 1
        self.size = tuple(x.shape[-2:])

    def node(self, t: torch.Tensor) -> _Node:
        return self.nodes[id(t)][1]

    def _tracked(self, t) -> bool:
        entry = self.nodes.get(id(t))
        return entry is not None and entry[0] is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in _tensors((args, kwargs)) if self._tracked(t)]
        if not inputs:
            return out
        name = getattr(func, "__name__", "")
        parents_of = {}
        for o in _tensors(out):
            parents = []
            for t in inputs:
                if t.dim() < 3 or o.dim() < 3:
                    geometry = "whole"
                elif name in _ARGS and (args[0] if args else kwargs.get("input")) is t:
                    geometry = _geometry(name, args, kwargs)
                elif t.shape[-2:] == o.shape[-2:]:
                    geometry = "same"
                else:
                    geometry = "whole"
                parents.append((self.node(t), geometry))
            parents_of[id(o)] = (o, parents)
        # Parents are read before any output replaces them: an in-place op's output is its own input.
        for key, (o, parents) in parents_of.items():
            self.nodes[key] = (o, _Node(self.count, o.shape, parents))
            self.count += 1
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def receptive_field(
    model: nn.Module,
    layer: str,
    position: tuple[int, int] | Sequence[tuple[int, int]] | None,
    input_size: int | tuple[int, int] | None = None,
) -> Box | list[Box]:
    """The exact input box of unit ``position`` (row, col) of ``layer`` (paper Fig. 2's image patches).

    ``position`` may also be a list of positions (one traced forward pass for all: a list of boxes), or None
    for a fully connected layer (the whole image). ``input_size`` (an int or (height, width)) defaults to
    ``model.input_size``. The box is end-exclusive and clipped to the image.
    """
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None:
        raise ConvscopeError("the model has no input_size attribute: pass input_size=(height, width)")
    h, w = _pair(size, None)
    module = site(model, layer)
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    x = torch.zeros(1, input_channels(model) or 3, h, w, **like)
    tracer = _Tracer(x)
    with torch.no_grad(), eval_mode(model):
        out = run_to(model, module, x, tracer)
    target = tracer.node(out) if tracer._tracked(out) else None
    if target is None:
        raise ConvscopeError(f"layer {layer!r} does not depend on the input")
    single = position is None or not isinstance(position[0], (tuple, list))
    positions = [position] if single else list(position)
    boxes = [_box(tracer, target, out, p, layer) for p in positions]
    return boxes[0] if single else boxes


def geometry(model: nn.Module, layers: Sequence[str], input_size: int | tuple[int, int]
             ) -> dict[str, tuple[int, int] | None]:
    """For each layer with feature maps: the side of a unit's receptive field where the image border does not
    clip it (a unit at the centre of an image four times as large, where the model takes one), and the step in
    pixels between neighbouring units; None for a layer without maps."""
    h, w = _pair(input_size, None)
    outs = _traced(model, [site(model, layer) for layer in layers], (h, w))[1]
    maps = [layer for layer, out in zip(layers, outs) if out.dim() == 4]
    found: dict[str, tuple[int, int] | None] = dict.fromkeys(layers)
    if not maps:
        return found
    try:  # the modules up to the deepest map run at any size, even where the classifier takes one size only
        tracer, outs = _traced(model, [site(model, layer) for layer in maps], (4 * h, 4 * w))
    except (RuntimeError, ValueError, ConvscopeError):
        tracer, outs = _traced(model, [site(model, layer) for layer in maps], (h, w))
    for layer, out in zip(maps, outs):
        if not tracer._tracked(out):
            continue
        rows, cols = out.shape[-2:]
        r, c = rows // 2, cols // 2
        box = _box(tracer, tracer.node(out), out, (r, c), layer)
        step = (_box(tracer, tracer.node(out), out, (r, c + 1), layer).x0 - box.x0) if c + 1 < cols else 0
        found[layer] = (max(box.y1 - box.y0, box.x1 - box.x0), step)
    return found


@dataclass(frozen=True)
class LayerRow:
    """One module as ``convscope layers`` shows it: its output (``shape`` without the batch; None when it is not
    a tensor or never ran), how many times it ran, its receptive field and stride in pixels (maps only), and what
    an analysis can probe there (``"maps"``, ``"vector"``, or ``""``)."""

    name: str
    kind: str
    alias: str | None
    shape: tuple[int, ...] | None
    calls: int
    field: int | None
    stride: int | None
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
                     *(shapes.get(i.name) or (None, None)),
                     {4: "maps", 2: "vector"}.get(len(i.shape), "") if i.shape else "",
                     i.name in defaults or aliases.get(i.name) in defaults) for i in infos]


def census_outputs(model: nn.Module, input_size: int) -> int:
    """How many outputs (classes) the model gives for one blank image."""
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    with torch.no_grad(), eval_mode(model):
        return int(model(torch.zeros(1, input_channels(model) or 3, input_size, input_size, **like)).shape[-1])


def _traced(model: nn.Module, sites: list, size: tuple[int, int]) -> tuple[_Tracer, list[torch.Tensor]]:
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    x = torch.zeros(1, input_channels(model) or 3, *size, **like)
    tracer = _Tracer(x)
    with torch.no_grad(), eval_mode(model):
        return tracer, run_to_all(model, sites, x, tracer)


def _box(tracer: _Tracer, target: _Node, out: torch.Tensor, position, layer: str) -> Box:
    if position is None or out.dim() < 3:
        if position is not None:
            raise ConvscopeError(f"layer {layer!r} has no spatial positions: pass position=None")
        span = None
    else:
        r, c = (int(v) for v in position)
        oh, ow = out.shape[-2:]
        if not (0 <= r < oh and 0 <= c < ow):
            raise ConvscopeError(f"position {(r, c)} out of range: layer {layer!r} has {oh}x{ow} maps")
        span = (r, r, c, c)
    spans: dict[int, Span | None] = {target.index: span}
    pending = {target.index: target}
    root = None
    while pending:  # newest first: every consumer of a node is newer than it, so its span is complete
        node = pending.pop(max(pending))
        span = spans[node.index]
        if node.index == 0:
            root = span
            continue
        for parent, geometry in node.parents:
            if span is None or geometry == "whole":
                new = None
            elif geometry == "same":
                new = span
            else:
                new = _back(span, geometry, tuple(parent.shape[-2:]))
            if parent.index in spans:
                new = _union(spans[parent.index], new)
            spans[parent.index] = new
            pending[parent.index] = parent
    if root is None:
        return Box(0, 0, *tracer.size)
    return Box(root[0], root[2], root[1] + 1, root[3] + 1)


def _union(a: Span | None, b: Span | None) -> Span | None:
    if a is None or b is None:
        return None
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


__all__ = ["Box", "LayerRow", "geometry", "layer_table", "receptive_field"]
