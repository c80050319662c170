"""Which input positions each tensor of one forward pass depends on: the graph behind receptive fields and behind
the census's word on which tensors are feature maps.

A ``TorchFunctionMode`` (:class:`Tracer`) records, for every tensor computed from the input, its parents, how
its positions map back to each parent's, and its **axes**: the two dimensions that hold the image's rows and
columns, ``(2, 3)`` for the ``(N, C, H, W)`` maps of a convolution, ``(1, 2)`` for the ``(N, H, W, C)`` tensors
a ConvNeXt block computes between two permutes. How a tensor depends on a parent (its *geometry*):

- ``conv2d`` / ``conv_transpose2d`` / ``max_pool2d`` / ``avg_pool2d`` / ``F.pad``: the window arithmetic,
  ``(kernel, stride, padding, dilation, transposed)`` per spatial dimension;
- ``"same"``: position p depends on the parent's position p. Permutes and transposes carry the axes along;
  elementwise ops, batch norm, concatenation along channels, and per-position ops on the channels (a
  ``Linear`` or ``LayerNorm`` on a channels-last tensor's last dimension) keep them;
- ``"gate"``: the parent holds one value per channel (``1 x 1`` at its axes) that every position is multiplied
  by or added to: squeeze-and-excitation's weights, an image-level branch broadcast back to the maps. Group
  and instance norm, and a layer norm over the positions, are ``"same"`` and ``"gate"`` at once: each position
  is normalised by statistics of all of them. Every position depends on the whole image through a gate, but
  the gate is not where it looks: receptive fields follow the convolutional path and say that a gate exists;
- ``"whole"``: every position depends on every parent position (flatten, linear layers on the positions,
  global pooling, a softmax over the positions, resizing).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# Positional argument names of the spatial ops whose geometry is known.
_ARGS = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose2d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor"),
    "pad": ("input", "pad", "mode", "value"),
}
_ARGS["max_pool2d_with_indices"] = _ARGS["max_pool2d"]
_MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_ALONG_DIM = {"softmax", "log_softmax", "softmin", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"}
_STATISTICS = {"group_norm", "instance_norm"}

Axes = tuple[int, int]


def pair(v, default) -> tuple[int, int]:
    """An int or a pair of ints as a pair (``default`` where ``v`` is None or empty)."""
    if v is None or (isinstance(v, (tuple, list)) and len(v) == 0):
        v = default
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _bound(name: str, args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_ARGS[name], args))
    bound.update(kwargs)
    return bound


def _window(name: str, args: tuple, kwargs: dict):
    """``(kernel, stride, padding, dilation, transposed)`` per spatial dimension, for a known spatial op."""
    bound = _bound(name, args, kwargs)
    if name == "pad":
        pad = bound["pad"]
        return (1, 1), (1, 1), (pad[2] if len(pad) > 2 else 0, pad[0]), (1, 1), False
    if name.startswith("conv"):
        k = tuple(bound["weight"].shape[-2:])
        d = pair(bound.get("dilation"), 1)
        p = bound.get("padding", 0)
        if p == "valid":
            p = (0, 0)
        elif p == "same":
            p = tuple((di * (ki - 1)) // 2 for ki, di in zip(k, d))
        return k, pair(bound.get("stride"), 1), pair(p, 0), d, name == "conv_transpose2d"
    k = pair(bound["kernel_size"], None)
    return k, pair(bound.get("stride"), k), pair(bound.get("padding"), 0), pair(bound.get("dilation"), 1), False


def _moved(name: str, args: tuple, kwargs: dict, ndim: int, axes: Axes) -> Axes | None:
    """Where a permute, transpose or movedim puts the dimensions ``axes``."""
    order = list(range(ndim))
    rest = list(args[1:]) + list(kwargs.values())
    try:
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            order = [int(d) % ndim for d in dims]
        elif name in ("movedim", "moveaxis"):
            src, dst = ([v] if isinstance(v, int) else list(v) for v in rest[:2])
            order = _movedim_order(ndim, src, dst)
        else:  # transpose, swapaxes: two dimensions swap
            a, b = (int(d) % ndim for d in rest[:2])
            order[a], order[b] = order[b], order[a]
    except (TypeError, ValueError, IndexError):
        return None
    return order.index(axes[0]), order.index(axes[1])


def _movedim_order(ndim: int, src: list, dst: list) -> list[int]:
    """The source dimension of each output dimension of ``movedim(src, dst)``."""
    src, dst = [s % ndim for s in src], [d % ndim for d in dst]
    order: list[int | None] = [None] * ndim
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(i for i in range(ndim) if i not in src)
    return [next(rest) if o is None else o for o in order]


def _mixed(name: str, args: tuple, kwargs: dict, ndim: int) -> tuple[set[int], bool]:
    """The dimensions of its input whose positions a shape-keeping op mixes, and whether it mixes them only through
    statistics (a normalisation) rather than by weights along them."""
    if name in ("linear", "matmul", "__matmul__"):
        return {ndim - 1}, False
    if name == "layer_norm":
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape", ())
        n = 1 if isinstance(shape, int) else len(shape)
        return set(range(ndim - n, ndim)), True
    if name in _STATISTICS:
        return set(range(2, ndim)), True
    if name in _ALONG_DIM:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        return ({int(dim) % ndim} if isinstance(dim, int) else set()), False
    return set(), False


class Node:
    """A tensor of the forward pass: its place in the order of computation, shape, parents with their geometry,
    and the dimensions holding rows and columns (None when it has none: a vector)."""

    __slots__ = ("index", "shape", "parents", "axes")

    def __init__(self, index: int, shape: torch.Size, parents: list, axes: Axes | None):
        self.index, self.shape, self.parents, self.axes = index, shape, parents, axes

    @property
    def size(self) -> tuple[int, int]:
        """Rows and columns."""
        return self.shape[self.axes[0]], self.shape[self.axes[1]]


class Tracer(TorchFunctionMode):
    """Record, for every tensor derived from the input ``x`` (``(N, C, H, W)``), its parents, how its positions map
    to theirs and which dimensions hold them."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.nodes: dict[int, tuple[torch.Tensor, Node]] = {id(x): (x, Node(0, x.shape, [], (2, 3)))}
        self.count = 1
        self.size = tuple(x.shape[-2:])

    def node(self, t: torch.Tensor) -> Node | None:
        """The node of a tensor computed from the input; None for any other."""
        entry = self.nodes.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [(t, n) for t in _tensors((args, kwargs)) if (n := self.node(t)) is not None]
        if not inputs:
            return out
        name = getattr(func, "__name__", "")
        first = args[0] if args else kwargs.get("input")
        found = {}
        for o in _tensors(out):
            parents, axes = [], None
            for t, n in inputs:
                geometry, kept = _geometry(name, args, kwargs, t, n, o, t is first)
                parents += [(n, g) for g in geometry]
                if axes is None and kept is not None:
                    axes = kept
            if axes is None and o.dim() >= 3:
                axes = (o.dim() - 2, o.dim() - 1)
            found[id(o)] = (o, parents, axes)
        # Parents are read before any output replaces them: an in-place op's output is its own input.
        for key, (o, parents, axes) in found.items():
            self.nodes[key] = (o, Node(self.count, o.shape, parents, axes))
            self.count += 1
        return out


def _geometry(name: str, args: tuple, kwargs: dict, t: torch.Tensor, n: Node, o: torch.Tensor, is_first: bool
              ) -> tuple[list, Axes | None]:
    """How output ``o`` depends on input ``t`` (a list of geometries), and the axes it keeps from ``t`` (None: it
    keeps none)."""
    if n.axes is None or o.dim() < 3:
        return ["whole"], None
    if is_first and name in _MOVES:
        axes = _moved(name, args, kwargs, t.dim(), n.axes)
        return (["same"], axes) if axes is not None else (["whole"], None)
    if is_first and name in _ARGS:
        if n.axes != (t.dim() - 2, t.dim() - 1):  # a convolution over other dimensions than the positions
            return ["whole"], None
        return [_window(name, args, kwargs)], (o.dim() - 2, o.dim() - 1)
    a, b = n.axes
    if o.dim() == t.dim() and (o.shape[a], o.shape[b]) == (t.shape[a], t.shape[b]):
        mixed, statistics = _mixed(name, args, kwargs, t.dim()) if is_first else (set(), False)
        if not mixed & {a, b}:
            return ["same"], n.axes
        return (["same", "gate"], n.axes) if statistics else (["whole"], None)
    if o.dim() == t.dim() and t.shape[a] == t.shape[b] == 1:
        return ["gate"], None
    if o.dim() != t.dim() and n.axes == (t.dim() - 2, t.dim() - 1) and o.shape[-2:] == t.shape[-2:]:
        return ["same"], (o.dim() - 2, o.dim() - 1)  # a reshape of the leading dimensions
    return ["whole"], None


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


__all__ = ["Node", "Tracer", "pair"]
