"""Naming the layer to probe: a module name from ``model.named_modules()``, or a paper alias; and which layers
an analysis uses by default.

Built-in models carry ``paper_layers``, a mapping from the paper's names (conv1..conv5, fc6, fc7) to the module
whose output is that layer's rectified output (PAPER.md section 1). Any other ``nn.Module`` is addressed by
module names. A module that the forward pass calls more than once (torchvision's ResNet blocks call one ReLU
twice) is probed at its first call; ``name#2`` names its second call, and so on (Captum's hooks see the last).

Defaults for a model without the paper's names come from one forward pass (:func:`census`): the **stages**,
the last module to finish at each spatial size of the feature maps (a ResNet's stem ReLU, ``layer1`` ..
``layer4``; a VGG's last ReLU before each pool), and the **penultimate** module, the last one before the
modules that produce the logits (a ResNet's ``avgpool``): the analogues of conv1..conv5 and fc7.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConvscopeError, unknown
from .forward import eval_mode, input_channels
from .positions import Tracer

CALL = "#"
PAPER_CONV = ("conv1", "conv2", "conv3", "conv4", "conv5")
PAPER_LAYERS = (*PAPER_CONV, "fc6", "fc7")


@dataclass(frozen=True)
class Site:
    """One place in the forward pass: the output of module ``name`` at its ``call``-th call (from 1)."""

    name: str
    module: nn.Module
    call: int = 1


def paper_names(model: nn.Module) -> dict[str, str]:
    """The paper's layer names the model declares (``conv1`` .. ``fc7`` -> module name), empty for a model without
    them: the one place that reads a model's ``paper_layers``."""
    names = getattr(model, "paper_layers", None)
    return dict(names) if isinstance(names, Mapping) else {}


def layer_names(model: nn.Module) -> list[str]:
    """Every name :func:`resolve_layer` accepts: paper aliases first, then module names."""
    aliases = list(paper_names(model))
    return aliases + [name for name, _ in model.named_modules() if name]


def _split_call(layer: str) -> tuple[str, int]:
    name, sep, call = layer.rpartition(CALL)
    if sep and call.isdigit() and int(call) >= 1:
        return name, int(call)
    return layer, 1


def resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """Return ``(module_name, module)`` for a paper alias or a module name (a ``#k`` call suffix is allowed);
    unknown names list the valid ones."""
    s = site(model, layer)
    return s.name, s.module


def site(model: nn.Module, layer: str) -> Site:
    """The :class:`Site` a layer name means: ``conv5`` (paper alias), ``features.11``, ``layer1.0.relu#2``."""
    if not isinstance(layer, str):
        raise ConvscopeError(f"a layer is named by a string, got {type(layer).__name__} {layer!r}")
    base, call = _split_call(layer)
    name = paper_names(model).get(base, base)
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise unknown("layer", layer, layer_names(model))
    return Site(name, modules[name], call)


@dataclass(frozen=True)
class ModuleInfo:
    """One module as one forward pass sees it: its output shape at its first call (None: not a tensor, or never
    called), how many times it ran, when its first call finished (``order``), the shape of its first input
    then, and which dimensions of its output hold the image's rows and columns (``axes``; None: none do)."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    calls: int
    order: int
    input_shape: tuple[int, ...] | None = None
    axes: tuple[int, int] | None = (2, 3)

    @property
    def probe(self) -> str:
        """What an analysis can probe here: ``"maps"`` (N, C, H, W), ``"vector"`` (N, C), ``"channels last"``
        (positions elsewhere than the last two dimensions: a ConvNeXt block's tensors between its permutes, not
        probed), or ``""``."""
        if self.shape is None:
            return ""
        if len(self.shape) == 4:
            return "maps" if self.axes in (None, (2, 3)) else "channels last"
        return "vector" if len(self.shape) == 2 else ""

    @property
    def maps(self) -> bool:
        return self.probe == "maps"


def census(model: nn.Module, input_size: int | tuple[int, int], channels: int | None = None) -> list[ModuleInfo]:
    """Every named module (the model itself excluded) after one forward pass of a blank image, batch 1, in
    ``named_modules`` order; the pass is traced (:mod:`convscope.positions`) to tell which outputs hold their
    positions where maps do."""
    from contextlib import ExitStack

    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    x = torch.zeros(1, channels or input_channels(model) or 3, h, w, **like)
    tracer = Tracer(x)
    seen: dict[str, list] = {}
    finished = [0]

    def hook(name: str):
        def record(_module, inputs, output):
            entry = seen.setdefault(name, [None, 0, finished[0], None, None])
            if entry[1] == 0:
                tensor = isinstance(output, torch.Tensor)
                entry[0] = tuple(output.shape) if tensor else None
                first = inputs[0] if inputs else None
                entry[3] = tuple(first.shape) if isinstance(first, torch.Tensor) else None
                node = tracer.node(output) if tensor else None
                entry[4] = node.axes if node is not None else None
            entry[1] += 1
            finished[0] += 1

        return record

    named = [(n, m) for n, m in model.named_modules() if n]
    with ExitStack() as stack, torch.no_grad(), eval_mode(model):
        for name, m in named:
            stack.enter_context(m.register_forward_hook(hook(name)))
        try:
            with tracer:
                model(x)
        except Exception as e:
            raise ConvscopeError(f"the model cannot take a {h}x{w} image ({type(e).__name__}: {e})") from e
    return [ModuleInfo(n, type(m).__name__, *(seen[n] if n in seen else (None, 0, -1, None, None))) for n, m in named]


def _by_order(infos: list[ModuleInfo]) -> list[ModuleInfo]:
    return sorted((i for i in infos if i.calls == 1 and i.shape is not None), key=lambda i: i.order)


def stages(infos: list[ModuleInfo]) -> list[str]:
    """The last module (called once) to finish at each spatial size of the feature maps, larger than 1x1, that is
    not inside a block that takes maps of that size and gives smaller ones: the first conv, batch norm and ReLU
    of a ResNet-50 bottleneck (or a ResNet-D block, an EfficientNet block) that downsamples on its 3x3 conv
    finish at the size of the stage before it, after that stage; they are the next stage's start, not a stage.
    Nor is a container of several stages (a ConvNeXt's ``features``, whose output is its last stage's)."""
    by_name = {i.name: i for i in infos}

    def opens_a_smaller_block(info: ModuleInfo) -> bool:
        parts = info.name.split(".")
        for k in range(1, len(parts)):
            block = by_name.get(".".join(parts[:k]))
            if (block is not None and block.input_shape is not None and block.shape is not None
                    and len(block.input_shape) == 4 and len(block.shape) == 4
                    and block.input_shape[-2:] == info.shape[-2:] and block.shape[-2:] != info.shape[-2:]):
                return True
        return False

    found = [i for i in _by_order(infos) if i.maps and i.shape[-1] * i.shape[-2] > 1 and not opens_a_smaller_block(i)]
    last: dict[tuple[int, int], ModuleInfo] = {}
    for info in found:
        if not any(o.name.startswith(info.name + ".") and o.shape[-2:] != info.shape[-2:] for o in found):
            last[info.shape[-2:]] = info  # dicts keep the order in which each size first appeared
    return [info.name for info in last.values()]


_PASS_THROUGH = ("Identity", "Dropout", "Dropout1d", "Dropout2d", "AlphaDropout")  # the identity in eval mode


def penultimate(infos: list[ModuleInfo], logits_shape: tuple[int, ...]) -> str | None:
    """The last module (called once) to finish before the modules whose output has the logits' shape, passing
    over a dropout or an identity (an EfficientNet's ``classifier.0``: the values of the pool before it)."""
    ordered = _by_order(infos)
    while ordered and ordered[-1].shape == tuple(logits_shape):
        ordered.pop()
    while len(ordered) > 1 and ordered[-1].kind in _PASS_THROUGH:
        ordered.pop()
    return ordered[-1].name if ordered else None


def output_layer(infos: list[ModuleInfo], logits_shape: tuple[int, ...]) -> str:
    """The module whose output is the model's: the last (called once) to finish with the logits' shape."""
    found = [i.name for i in _by_order(infos) if i.shape == tuple(logits_shape)]
    if not found:
        raise ConvscopeError("found no module whose output is the model's logits (the model computes them outside "
                             "any module); wrap the last step in a module")
    return found[-1]


def map_layers(model: nn.Module, infos: list[ModuleInfo]) -> list[str]:
    """The layers with feature maps the analyses show by default: conv1..conv5, or the model's stages."""
    aliases = paper_names(model)
    found = [n for n in PAPER_CONV if n in aliases] or stages(infos)
    if not found:
        raise ConvscopeError(f"found no layer with feature maps larger than 1x1 in this model; pass --layers "
                             f"(candidates: {candidates(infos) or 'none'})")
    return found


def vector_layer(model: nn.Module, infos: list[ModuleInfo], outputs: int) -> str:
    """The paper's layer 7 (fc7), or the model's penultimate module (the last before its ``outputs`` logits)."""
    if "fc7" in paper_names(model):
        return "fc7"
    found = penultimate(infos, (1, outputs))
    if found is None:
        raise ConvscopeError("found no module before this model's output layer; pass the layers to use")
    return found


def feature_layers(model: nn.Module, infos: list[ModuleInfo], outputs: int) -> list[str]:
    """The layers the probes read by default: conv1..fc7, or the model's stages and its penultimate module."""
    aliases = paper_names(model)
    paper = [n for n in PAPER_LAYERS if n in aliases]
    if paper:
        return paper
    maps, last = map_layers(model, infos), vector_layer(model, infos, outputs)
    return maps if last in maps else [*maps, last]


def candidates(infos: list[ModuleInfo], n: int = 12) -> str:
    """Some probeable module names (4-D outputs, called once), for an error that asks for ``--layers``."""
    names = [i.name for i in _by_order(infos) if i.maps]
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


__all__ = ["CALL", "PAPER_CONV", "PAPER_LAYERS", "ModuleInfo", "Site", "census", "feature_layers", "layer_names",
           "map_layers", "paper_names", "penultimate", "resolve_layer", "site", "stages", "vector_layer"]
