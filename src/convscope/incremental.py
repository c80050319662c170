"""Forward passes of one image with a patch pasted at many places, computed incrementally (Krypton: Nakandala,
Kumar and Papakonstantinou, "Incremental and Approximate Inference for Faster Occlusion-based Deep CNN
Explanations", SIGMOD 2019).

A patch changes only part of each layer's maps: in a convolution or a pooling, the outputs whose windows meet
the changed inputs; in a pointwise op, the same positions. So the clean image runs once, every node's output is
kept, and each patched copy recomputes only a box per node, read from the clean map with the changed values
pasted in. Krypton's trick keeps it batched: for the K positions of a batch, a node's box has one size (the
largest any of them needs) and its own offset per position, kept inside the map, so each layer runs as one op
on a (K, C, h, w) tensor; the few unchanged values recomputed with it come out as they were, so it stays exact.

The model is traced with ``torch.fx``. Boxes pass through convolutions, max pooling, average pooling where its
divisor is the same for every window, pointwise ops (activations, batch norm and dropout in eval mode, local
response norm, convscope's ``Normalize``) and the sum, difference or product of two maps (a residual: the union
of their boxes). At any other op (flatten, linear, cat, ...) or once a box covers its whole map, the change is
pasted into the clean map (materialised) and the rest of the graph runs densely. :func:`engine` builds one and
checks it against the model's own forward pass at a few positions; where it cannot be exact (the model does not
trace, has hooks, or an in-place op changes a value read again), it says why and gives none.

Approximation (Krypton's projective-field thresholding): ``tau`` caps each box's side at that fraction of its
map's side, centred on the box it replaces; changes outside the cap are dropped. The paper tunes its threshold
per model against a target quality of the heat map; :data:`TAU` is convscope's default, and
``benchmarks/occlusion.py`` measures its error against the exact maps.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import ConvscopeError
from .forward import preprocessing, preprocessing_hook, run_to_all
from .models.convnet import ContrastNorm, Normalize

TAU = 0.4  # the projective-field threshold of the approximate mode: a box's side at most 0.4 of its map's


def map_totals(act: torch.Tensor) -> torch.Tensor:
    """Per image, per map: the sum over the map (a unit of a vector is its own map)."""
    return act.flatten(2).sum(-1) if act.dim() > 2 else act


# ------------------------------------------------------------------------------------------------ boxes


@dataclass
class _Box:
    """A change confined to one (h, w) box per position: ``patch`` (K, C, h, w) holds the new values, ``y`` and
    ``x`` (K,) the box's top-left corner in the map (long, on the CPU: geometry is cheap bookkeeping)."""

    patch: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor


def _span(start: torch.Tensor, n: int) -> torch.Tensor:
    """(K, n): the n rows (or columns) from each start."""
    return start[:, None] + torch.arange(n)


def _flat_index(rows: torch.Tensor, cols: torch.Tensor, width: int, channels: int, device) -> torch.Tensor:
    """(K, channels, h * w) positions in a flattened map of ``width`` columns, one row of ``rows`` and of
    ``cols`` per position (the same for every channel)."""
    index = (rows[:, :, None] * width + cols[:, None, :]).flatten(1).to(device)
    return index[:, None].expand(-1, channels, -1)


def _gather(src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(K, C, h, w): for each position k, ``src`` at ``rows[k]`` x ``cols[k]``; ``src`` is one map (1, C, H, W),
    shared by all, or one per position."""
    k, c = len(rows), src.shape[1]
    index = _flat_index(rows, cols, src.shape[-1], c, src.device)
    return src.flatten(2).expand(k, c, -1).gather(2, index).view(k, c, rows.shape[1], cols.shape[1])


def _paste(dst: torch.Tensor, patch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``patch`` (K, C, h, w) written into ``dst`` (K, C, H, W, contiguous) at ``rows[k]`` x ``cols[k]``."""
    k, c = patch.shape[:2]
    dst.view(k, c, -1).scatter_(2, _flat_index(rows, cols, dst.shape[-1], c, dst.device), patch.reshape(k, c, -1))
    return dst


def _materialise(box: _Box, clean: torch.Tensor) -> torch.Tensor:
    """The K maps in full: the clean map with each position's box pasted in."""
    full = clean.expand(len(box.y), *clean.shape[1:]).clone(memory_format=torch.contiguous_format)
    return _paste(full, box.patch, _span(box.y, box.patch.shape[-2]), _span(box.x, box.patch.shape[-1]))


def _read(clean: torch.Tensor, box: _Box, top: int, left: int, wy: torch.Tensor, wx: torch.Tensor, hw: int,
          ww: int) -> torch.Tensor:
    """(K, C, hw, ww): the window at (wy, wx) of ``clean`` (1, C, H, W; padded by ``top`` rows and ``left``
    columns) with each position's box pasted in; the part of a box outside its window is left out."""
    rows, cols = _span(wy, hw), _span(wx, ww)
    out = _gather(clean, rows, cols)
    h, w = box.patch.shape[-2:]
    dy, dx = box.y + top - wy, box.x + left - wx
    if bool((dy >= 0).all() and (dy + h <= hw).all() and (dx >= 0).all() and (dx + w <= ww).all()):
        return _paste(out, box.patch, _span(dy, h), _span(dx, w))  # every box inside its window: write it in
    pr, pc = rows - (box.y + top)[:, None], cols - (box.x + left)[:, None]
    inside = ((pr >= 0) & (pr < h))[:, :, None] & ((pc >= 0) & (pc < w))[:, None, :]
    part = _gather(box.patch, pr.clamp(0, h - 1), pc.clamp(0, w - 1))
    return torch.where(inside[:, None].to(out.device), part, out)


def _fit(lo: torch.Tensor, hi: torch.Tensor, size: int, cap: int | None) -> tuple[torch.Tensor, int]:
    """One box side n for all positions that holds each range lo..hi (the longest; at most ``cap`` when given,
    then centred on each range), and each box's start, kept inside a map of ``size``."""
    count = hi - lo + 1
    n = min(int(count.max()), size if cap is None else cap)
    return (lo + (count - n).div(2, rounding_mode="floor")).clamp(0, size - n), n


def _cap(tau: float | None, size: int) -> int | None:
    return None if tau is None else max(1, min(size, math.ceil(tau * size)))


def _reach(a: torch.Tensor, n: int, pad: int, k: int, s: int, d: int, size: int) -> tuple[torch.Tensor, ...]:
    """The first and last of the ``size`` outputs along one axis whose windows (kernel k, stride s, dilation d,
    ``pad`` before the first input) meet inputs a..a+n-1; at least one output (a stride can skip a box)."""
    lo = (a + pad - d * (k - 1) + s - 1).div(s, rounding_mode="floor").clamp(0, size - 1)
    hi = torch.maximum((a + n - 1 + pad).div(s, rounding_mode="floor").clamp(max=size - 1), lo)
    return lo, hi


# ------------------------------------------------------------------------------------------------ rules


class _Pointwise:
    """An op of each value alone (or of each pixel's channels): the same box, the op run on the patch."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, box: _Box, tau: float | None) -> _Box:
        return _Box(self.fn(box.patch), box.y, box.x)


class _PerPixel:
    """``(x - mean) / std`` with a mean per pixel (convscope's ``Normalize``, paper section 3): the same box,
    the mean read where the box is."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean[None], std

    def __call__(self, box: _Box, tau: float | None) -> _Box:
        h, w = box.patch.shape[-2:]
        return _Box((box.patch - _gather(self.mean, _span(box.y, h), _span(box.x, w))) / self.std, box.y, box.x)


class _Window:
    """A convolution or pooling (``op`` run without padding): the outputs whose windows meet the box, from those
    windows of the clean input (padded with the op's pad value: 0, or -inf for max pooling, bottom and right
    far enough for ceil mode) with the box pasted in."""

    def __init__(self, op, kernel, stride, dilation, pads: tuple[int, int, int, int], value: float,
                 clean_in: torch.Tensor, out_hw: tuple[int, int]):
        self.op, self.kernel, self.stride, self.dilation, self.out_hw = op, kernel, stride, dilation, out_hw
        self.top, self.left = pads[0], pads[2]
        self.padded = F.pad(clean_in, (pads[2], pads[3], pads[0], pads[1]), value=value)

    def __call__(self, box: _Box, tau: float | None) -> _Box:
        (kh, kw), (sh, sw), (dh, dw), (oh, ow) = self.kernel, self.stride, self.dilation, self.out_hw
        h, w = box.patch.shape[-2:]
        y, nh = _fit(*_reach(box.y, h, self.top, kh, sh, dh, oh), oh, _cap(tau, oh))
        x, nw = _fit(*_reach(box.x, w, self.left, kw, sw, dw, ow), ow, _cap(tau, ow))
        window = _read(self.padded, box, self.top, self.left, y * sh, x * sw,
                       (nh - 1) * sh + dh * (kh - 1) + 1, (nw - 1) * sw + dw * (kw - 1) + 1)
        return _Box(self.op(window), y, x)


class _Binary:
    """The sum, difference or product of two maps of one shape (a residual): the union of the two boxes, each
    operand read there from its clean map with its own box pasted in."""

    def __init__(self, op, clean_a: torch.Tensor, clean_b: torch.Tensor):
        self.op, self.clean_a, self.clean_b = op, clean_a, clean_b

    def __call__(self, a: _Box, b: _Box, tau: float | None) -> _Box:
        (ha, wa), (hb, wb) = a.patch.shape[-2:], b.patch.shape[-2:]
        size_h, size_w = self.clean_a.shape[-2:]
        y, nh = _fit(torch.minimum(a.y, b.y), torch.maximum(a.y + ha, b.y + hb) - 1, size_h, _cap(tau, size_h))
        x, nw = _fit(torch.minimum(a.x, b.x), torch.maximum(a.x + wa, b.x + wb) - 1, size_w, _cap(tau, size_w))
        return _Box(self.op(_read(self.clean_a, a, 0, 0, y, x, nh, nw), _read(self.clean_b, b, 0, 0, y, x, nh, nw)),
                    y, x)


# ------------------------------------------------------------------------------------------------ the plan


class _Unsupported(Exception):
    """The model cannot be computed incrementally and exactly; the message says why."""


class _Tracer(fx.Tracer):
    """``torch.fx`` tracing that keeps convscope's ``Normalize`` and local response norms whole (they are
    pointwise in space; ``Normalize`` branches on its crop origins) and records, per module name, the node of
    each of its calls (a probed layer's output, ``name#k`` included)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list[fx.Node | None]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize | nn.LocalResponseNorm) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        self.calls.setdefault(self.path_of_module(m), []).append(out.node if isinstance(out, fx.Proxy) else None)
        return out


def _check_hooks(model: nn.Module) -> None:
    """Hooks run around modules, which a traced graph does not call: any but the input hooks is a reason."""
    glob = nn.modules.module
    if getattr(glob, "_global_forward_hooks", None) or getattr(glob, "_global_forward_pre_hooks", None):
        raise _Unsupported("global forward hooks are registered (a traced graph would not run them)")
    for name, m in model.named_modules():
        pre = [k for k in m._forward_pre_hooks if not (m is model and k == preprocessing_hook(model))]
        if m._forward_hooks or pre:
            raise _Unsupported(f"module {name or 'the model'!r} has forward hooks (a traced graph would not run them)")


_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def _runner(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Callable, bool]:
    """How to run ``node`` on (args, kwargs) without changing its inputs (the clean map is reused by every
    batch), and whether the model's own op writes into its first input."""
    if node.op == "call_module":
        m = modules[node.target]
        if getattr(m, "inplace", False) is True:
            m = copy.copy(m)  # shares the parameters; only this copy's flag changes
            m.inplace = False
            return (lambda a, k: m(*a, **k)), True
        return (lambda a, k: m(*a, **k)), False
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__"):
            if not hasattr(torch.Tensor, name[:-1]):
                raise _Unsupported(f"in-place method {name} has no out-of-place twin")
            return (lambda a, k: getattr(a[0], name[:-1])(*a[1:], **k)), True
        return (lambda a, k: getattr(a[0], name)(*a[1:], **k)), False
    fn = node.target
    if fn is operator.setitem:
        raise _Unsupported("an item assignment writes into a map in place")
    if fn in _INPLACE_OPERATORS:
        return _call(_INPLACE_OPERATORS[fn]), True
    name = getattr(fn, "__name__", "")
    if name.endswith("_") and not name.endswith("__") and fn is getattr(torch, name, None):
        if not hasattr(torch, name[:-1]):
            raise _Unsupported(f"in-place torch.{name} has no out-of-place twin")
        return _call(getattr(torch, name[:-1])), True
    if node.kwargs.get("inplace") is True:
        return (lambda a, k: fn(*a, **{**k, "inplace": False})), True
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature has no inplace flag
        params = []
    if "inplace" in params and len(node.args) > params.index("inplace") and node.args[params.index("inplace")]:
        raise _Unsupported(f"{name} is called in place with a positional flag")
    return _call(fn), False


def _call(fn: Callable) -> Callable:
    return lambda a, k: fn(*a, **k)


def _attr(model: nn.Module, target: str):
    value = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _window_rule(m: nn.Module, clean_in: torch.Tensor, clean_out: torch.Tensor) -> _Window | None:
    """The window rule of a convolution or pooling module, or None where the box rule would not be exact (another
    padding mode, a divisor that changes at the border, an adaptive pool whose bins differ in size)."""
    size, out = clean_in.shape[-2:], clean_out.shape[-2:]
    kind, value = type(m), 0.0
    if kind is nn.Conv2d and m.padding_mode == "zeros":
        k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        if isinstance(m.padding, str):  # "same" puts the odd pixel at the bottom and right, as F.conv2d does
            total = [0, 0] if m.padding == "valid" else [d[i] * (k[i] - 1) for i in range(2)]
            pads = [(t // 2, t - t // 2) for t in total]
        else:
            pads = [(p, p) for p in _pair(m.padding)]

        def op(w):
            return F.conv2d(w, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
    elif kind is nn.MaxPool2d and not m.return_indices:
        k, s, d, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation), _pair(m.padding)
        # Ceil mode: the last window may leave the map; -inf padding far enough makes it a plain window.
        pads = [(p[i], max(p[i], (out[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 - size[i] - p[i])) for i in range(2)]
        value = -math.inf

        def op(w):
            return F.max_pool2d(w, k, s, 0, d)
    elif kind is nn.AvgPool2d and (not any(_pair(m.padding)) or m.count_include_pad):
        k, s, d = _pair(m.kernel_size), _pair(m.stride), (1, 1)
        pads = [(p, p) for p in _pair(m.padding)]

        def op(w):
            return F.avg_pool2d(w, k, s, 0, False, True, m.divisor_override)
    elif kind in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d) and not getattr(m, "return_indices", False) and all(
            size[i] % out[i] == 0 for i in range(2)):  # equal bins: a plain pooling
        k = s = (size[0] // out[0], size[1] // out[1])
        d, pads = (1, 1), [(0, 0), (0, 0)]
        value = -math.inf if kind is nn.AdaptiveMaxPool2d else 0.0
        pool = F.max_pool2d if kind is nn.AdaptiveMaxPool2d else F.avg_pool2d

        def op(w):
            return pool(w, k, s)
    else:
        return None
    # Every window of the output inside the padded map (for average pooling: no ceil-mode window with a smaller
    # divisor), else the rule would not compute what the module does.
    if any((size[i] + sum(pads[i]) - d[i] * (k[i] - 1) - 1) // s[i] + 1 != out[i] for i in range(2)):
        return None
    return _Window(op, k, s, d, (*pads[0], *pads[1]), value, clean_in, tuple(out))


_POINTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                      nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
                      nn.LocalResponseNorm, ContrastNorm)
_POINTWISE_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.relu6, F.hardtanh, F.elu, F.gelu, F.silu, torch.sigmoid,
                        torch.tanh, F.local_response_norm)
_POINTWISE_METHODS = ("relu", "sigmoid", "tanh", "contiguous", "clone")
_BINARY_FUNCTIONS = (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul)
_BINARY_METHODS = ("add", "sub", "mul")


def _elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """"unary" for an op of each value alone (a pixel's channels together at most), "binary" for a sum,
    difference or product, else None."""
    target = node.target
    if node.op == "call_module":
        m = modules[target]
        if type(m) in _POINTWISE_MODULES or (type(m) in (nn.Dropout, nn.Dropout2d) and not m.training):
            return "unary"
        bn = type(m) is nn.BatchNorm2d and not m.training and m.track_running_stats and m.running_mean is not None
        return "unary" if bn else None
    if node.op == "call_method":
        target = target[:-1] if target.endswith("_") and not target.endswith("__") else target
        return "unary" if target in _POINTWISE_METHODS else "binary" if target in _BINARY_METHODS else None
    target = _INPLACE_OPERATORS.get(target, target)
    if getattr(target, "__name__", "").endswith("_") and target is getattr(torch, target.__name__, None):
        target = getattr(torch, target.__name__[:-1], None)
    return "unary" if target in _POINTWISE_FUNCTIONS else "binary" if target in _BINARY_FUNCTIONS else None


def _spatial_constant(value) -> bool:
    """A constant operand that does not vary over the map: a number, or a tensor of one value per channel."""
    if not isinstance(value, torch.Tensor):
        return isinstance(value, int | float | bool)
    return value.numel() == 1 or (value.dim() >= 2 and value.shape[-2:] == (1, 1))


def _rule(node: fx.Node, run: Callable, modules: dict[str, nn.Module], clean: dict, dependent: set):
    """The rule that carries a box through ``node``, with the operands it takes (the node's inputs that depend on
    the image), or (None, ()): there the change is materialised and the node runs densely."""
    operands = tuple(dict.fromkeys(n for n in node.all_input_nodes if n in dependent))
    out = clean[node]
    if not (isinstance(out, torch.Tensor) and out.dim() == 4 and operands and all(
            isinstance(clean[n], torch.Tensor) and clean[n].dim() == 4 for n in operands)):
        return None, ()
    src = operands[0]
    if node.op == "call_module" and node.args == (src,) and not node.kwargs:
        m = modules[node.target]
        if isinstance(m, Normalize) and m.origins is None:
            if m.mean.shape[-2:] == clean[src].shape[-2:]:
                return _PerPixel(m.mean, m.std), operands
            return _Pointwise(lambda p: (p - m.mean.mean((-2, -1), keepdim=True)) / m.std), operands
        window = _window_rule(m, clean[src], out)
        if window is not None:
            return window, operands
    kind = _elementwise(node, modules)
    if kind is None:
        return None, ()
    if len(operands) == 1 and out.shape == clean[src].shape:
        constants = [clean[n] for n in node.all_input_nodes if n is not src]
        constants += [a for a in (*node.args, *node.kwargs.values()) if not isinstance(a, fx.Node)]
        if kind == "binary" and not all(_spatial_constant(c) for c in constants):
            return None, ()

        def fn(p: torch.Tensor) -> torch.Tensor:
            return run(*fx.node.map_arg((node.args, node.kwargs), lambda n: p if n is src else clean[n]))

        return _Pointwise(fn), operands
    if kind == "binary" and len(operands) == 2 and node.args == operands and (
            clean[operands[0]].shape == clean[operands[1]].shape == out.shape):
        kwargs = fx.node.map_arg(node.kwargs, lambda n: clean[n])
        return _Binary(lambda a, b: run((a, b), kwargs), clean[operands[0]], clean[operands[1]]), operands
    return None, ()


def _macs(node: fx.Node, modules: dict[str, nn.Module]) -> int:
    """Multiply-adds per output value of a convolution or linear module (0 for anything else)."""
    m = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, nn.Conv2d):
        return m.in_channels // m.groups * math.prod(m.kernel_size)
    return m.in_features if isinstance(m, nn.Linear) else 0


@dataclass
class _Step:
    node: fx.Node
    run: Callable  # (args, kwargs) -> value, densely and out of place
    rule: object | None  # carries boxes through the node; None: materialise and run densely
    operands: tuple  # the inputs the rule takes
    macs: int  # multiply-adds per output value
    free: tuple  # nodes whose values are no longer needed after this step


class Incremental:
    """Forward passes of one image with a patch pasted at K places at a time, each node recomputed only where the
    patch reaches it (see the module's doc). Build one with :func:`engine`, which checks it; call it with the
    patch's top-left corners (K, 2) and the patch (C, s, s), as the model takes images (before its input hooks).

    ``macs`` counts the multiply-adds of the convolutions and linear layers run so far; ``dense_macs`` those of
    one dense forward pass (the work it replaces, per position)."""

    def __init__(self, model: nn.Module, image: torch.Tensor, probe=None):
        _check_hooks(model)
        tracer = _Tracer()
        try:
            graph = tracer.trace(model)
        except Exception as e:  # fx fails on data-dependent control flow in many ways; the reason is reported
            raise _Unsupported(f"torch.fx cannot trace the model ({type(e).__name__}: {e})") from e
        self.model, modules = model, dict(model.named_modules())
        nodes = list(graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.input = placeholders[0]
        if any(not n.args for n in placeholders[1:]):
            raise _Unsupported("the model's forward takes more than the image")
        self.output = nodes[-1].args[0]
        if not isinstance(self.output, fx.Node):
            raise _Unsupported("the model returns more than one tensor")
        self.probe = self._probe_node(tracer.calls, probe)
        made = {n: _runner(n, modules) for n in nodes if n.op.startswith("call_")}
        runners = {n: run for n, (run, _) in made.items()}
        self.clean = self._clean_pass(nodes, runners, image)
        dependent = self._dependent(nodes, {n for n, (_, inplace) in made.items() if inplace})
        self.steps = self._plan(nodes, runners, modules, dependent)
        self.macs = 0
        self.dense_macs = sum(s.macs * self.clean[s.node].numel() for s in self.steps)
        act = self.clean[self.probe] if self.probe is not None else None
        self.integral = None  # the probed map's sums from the top-left corner, (C, H + 1, W + 1), float64
        if isinstance(act, torch.Tensor) and act.dim() == 4:
            self.integral = F.pad(act[0].double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))

    def _probe_node(self, calls: dict, probe) -> fx.Node | None:
        """The node whose output is the probed site's (its ``call``-th call), the model's output for the model."""
        if probe is None or probe.module is self.model:
            return None if probe is None else self.output
        found = calls.get(probe.name, [])
        if len(found) < probe.call or found[probe.call - 1] is None:
            raise _Unsupported(f"layer {probe.name!r} (call {probe.call}) is not one tensor of the traced graph")
        return found[probe.call - 1]

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through the model's declared preprocessing (its normalisation, the move to its device), as
        ``model(x)`` sends it to the first module."""
        return preprocessing(self.model).apply(self.model, x)

    def _clean_pass(self, nodes: list, runners: dict, image: torch.Tensor) -> dict:
        """Every node's output on the clean image (batch 1), computed out of place so that each stays as it was."""
        values: dict = {}
        with torch.inference_mode():
            for n in nodes:
                if n.op == "placeholder":
                    values[n] = self._prepare(image[None]) if n is self.input else n.args[0]
                elif n.op == "get_attr":
                    values[n] = _attr(self.model, n.target)
                elif n.op != "output":
                    values[n] = runners[n](*fx.node.map_arg((n.args, n.kwargs), values.__getitem__))
        return values

    def _dependent(self, nodes: list, inplace: set) -> set:
        """The nodes that depend on the image. An op that writes into a value read again after it (the clean
        pass ran it out of place) is a reason to give up."""
        order = {n: i for i, n in enumerate(nodes)}
        dependent = {self.input}
        for n in nodes:
            if n.op.startswith("call_") and any(a in dependent for a in n.all_input_nodes):
                dependent.add(n)
        for n in nodes:
            target = n.args[0] if n in inplace and n.args else None
            if isinstance(target, fx.Node):
                later = [u for u in target.users if order[u] > order[n]]
                if later:
                    raise _Unsupported(f"{n.name} writes in place into {target.name}, which {later[0].name} reads "
                                       f"after it")
        return dependent

    def _plan(self, nodes: list, runners: dict, modules: dict, dependent: set) -> list[_Step]:
        """One step per node that depends on the image, with its rule and what can be freed after it."""
        todo = [n for n in nodes if n in dependent and n.op.startswith("call_")]
        last = {n: i for i, step in enumerate(todo) for n in step.all_input_nodes if n in dependent}
        last[self.output] = len(todo)  # kept to the end
        frees: dict[int, list] = {}
        for n, i in last.items():
            frees.setdefault(i, []).append(n)
        rules = [_rule(n, runners[n], modules, self.clean, dependent) for n in todo]
        if not any(isinstance(rule, _Window) for rule, _ in rules):
            raise _Unsupported("no convolution or pooling that a box passes through: nothing to save")
        return [_Step(n, runners[n], rule, operands, _macs(n, modules), tuple(frees.get(i, ())))
                for i, (n, (rule, operands)) in enumerate(zip(todo, rules))]

    def _settle(self, value, node: fx.Node):
        """A box that covers its whole map is the map itself: from there on the node is dense."""
        if isinstance(value, _Box) and value.patch.shape[-2:] == self.clean[node].shape[-2:]:
            return value.patch
        return value

    def _totals(self, value) -> torch.Tensor:
        """Per position, per map of the probed layer: its sum. From a box: the clean map's total, less the clean
        sum over the box (the integral image), plus the box's new sum, in float64."""
        if not isinstance(value, _Box):
            return map_totals(value)
        h, w = value.patch.shape[-2:]
        s, y, x = self.integral, value.y.to(self.integral.device), value.x.to(self.integral.device)
        inside = s[:, y + h, x + w] - s[:, y, x + w] - s[:, y + h, x] + s[:, y, x]  # (C, K)
        return (s[:, -1, -1, None] - inside + value.patch.double().sum((-2, -1)).T).T.to(value.patch.dtype)

    def __call__(self, corners: torch.Tensor, patch: torch.Tensor, tau: float | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """For each top-left corner (K, 2), the image with ``patch`` (C, s, s, or one per corner) there: the probed
        layer's per-map totals (K, maps; None without a probe) and the model's output (K, ...). ``tau`` caps
        each box's side at that fraction of its map's side (approximate; None: exact)."""
        corners = torch.as_tensor(corners).long().cpu()
        k, (height, width) = len(corners), self.clean[self.input].shape[-2:]
        y, x = corners[:, 0], corners[:, 1]
        if k == 0 or y.min() < 0 or x.min() < 0 or (y + patch.shape[-2]).max() > height or (
                x + patch.shape[-1]).max() > width:
            raise ConvscopeError(f"every patch must lie inside the {height}x{width} image")
        with torch.inference_mode():
            patch = self._prepare(patch.expand(k, *patch.shape[-3:]))
            states = {self.input: self._settle(_Box(patch, y, x), self.input)}
            materialised: dict = {}

            def value(n: fx.Node):
                if n not in states:
                    return self.clean[n]
                if isinstance(states[n], _Box):
                    if n not in materialised:
                        materialised[n] = _materialise(states[n], self.clean[n])
                    return materialised[n]
                return states[n]

            totals = None
            for step in self.steps:
                ins = [states[n] for n in step.operands]
                if step.rule is not None and all(isinstance(v, _Box) for v in ins):
                    out = self._settle(step.rule(*ins, tau), step.node)
                else:
                    out = step.run(*fx.node.map_arg((step.node.args, step.node.kwargs), value))
                states[step.node] = out
                if step.macs:
                    self.macs += step.macs * (out.patch if isinstance(out, _Box) else out).numel()
                if step.node is self.probe:
                    totals = self._totals(out)
                for n in step.free:
                    states.pop(n, None)
                    materialised.pop(n, None)
            return totals, value(self.output)


CHECK_RTOL = 1e-4  # float32 rounding: a window summed in another order than the whole map


def engine(model: nn.Module, image: torch.Tensor, probe, patch: torch.Tensor, corners: torch.Tensor
           ) -> tuple[Incremental | None, str]:
    """An :class:`Incremental` for ``model`` (in the mode it is in) on ``image`` (C, H, W), probing ``probe`` (a
    :class:`~convscope.layers.Site`, or None), and why it is exact: checked against the model's own forward pass
    with ``patch`` at the first, middle and last of ``corners`` (K, 2). Where it cannot be exact: None, and why
    not (the caller runs the model densely)."""
    try:
        inc = Incremental(model, image, probe)
    except _Unsupported as e:
        return None, str(e)
    pick = corners[sorted({0, len(corners) // 2, len(corners) - 1})]
    totals, out = inc(pick, patch)
    x = _materialise(_Box(patch.expand(len(pick), *patch.shape[-3:]).to(image), pick[:, 0], pick[:, 1]), image[None])
    with torch.inference_mode():  # copied as each runs: a later in-place op does not change it
        want = run_to_all(model, [model] if probe is None else [probe, model], x, keep=torch.clone)
    got, names = ([out], ["the output"]) if probe is None else ([totals, out], ["the probed layer", "the output"])
    if probe is not None:
        want[0] = map_totals(want[0])
    for mine, ref, name in zip(got, want, names):
        if mine.shape != ref.shape:
            return None, f"the incremental pass gives {name} shape {tuple(mine.shape)}, the model {tuple(ref.shape)}"
        err, scale = float((mine.to(ref) - ref).abs().max()), float(ref.abs().max())
        if not err <= CHECK_RTOL * scale:
            return None, (f"the incremental pass differs from the model's forward pass by {err:.3g} (largest value "
                          f"{scale:.3g}) at {name}")
    inc.macs = 0
    return inc, f"incremental (Krypton), checked against the model's forward pass at {len(pick)} positions"
