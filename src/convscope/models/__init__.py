"""The model registry: ``create_model(name, num_classes)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from ..errors import ConvscopeError, check_float, check_int, unknown
from .convnet import ALEXNET, ALEXNET_SMALL, REMOVABLE, ZFNET, ZFNET_SMALL, ConvNet, NetSpec, plan
from .tvlayout import VGG16, TorchvisionAlexNet

_SPECS = {"zfnet": ZFNET, "alexnet": ALEXNET, "zfnet_small": ZFNET_SMALL, "alexnet_small": ALEXNET_SMALL}


def _variant(spec: NetSpec, variant: dict) -> NetSpec:
    bad = sorted(set(variant) - set(NetSpec.__dataclass_fields__), key=str)
    if bad:
        raise ConvscopeError(f"unknown model options {bad}; valid: {', '.join(NetSpec.__dataclass_fields__)}")
    variant = dict(variant)
    for key in ("widths", "fc", "remove", "conv1", "conv2"):
        if key in variant:
            if not isinstance(variant[key], list | tuple):
                raise ConvscopeError(f"model option {key} must be a list, got {variant[key]!r:.40}")
            variant[key] = tuple(variant[key])
    return replace(spec, **variant)


def _convnet(spec: NetSpec) -> Callable[..., nn.Module]:
    def make(num_classes: int = 1000, **variant) -> nn.Module:
        return ConvNet(_variant(spec, variant), num_classes)

    return make


_REGISTRY: dict[str, Callable[..., nn.Module]] = {name: _convnet(spec) for name, spec in _SPECS.items()}
_REGISTRY["vgg16"] = VGG16
_REGISTRY["alexnet_torchvision"] = TorchvisionAlexNet


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def check_options(name: str, options: dict) -> None:
    """The options of a registered model checked without building it (no memory, no time): what a config file
    may say wrong fails here, before any run starts."""
    import inspect

    if name not in _REGISTRY:
        raise unknown("model", name, list_models())
    if not isinstance(options, dict):
        raise ConvscopeError(f"model_options must be a table of options, got {options!r:.40}")
    if name in _SPECS:
        plan(_variant(_SPECS[name], options))
        return
    params = inspect.signature(_REGISTRY[name]).parameters
    bad = sorted(set(options) - set(params) - {"num_classes"}, key=str)
    if bad:
        raise ConvscopeError(f"unknown model options {bad} for {name}; valid: {', '.join(p for p in params)}")
    if "input_size" in options:
        check_int(options["input_size"], "input_size", 8, 4096)
    if "dropout" in options:
        check_float(options["dropout"], "dropout", 0.0, 1.0, open_hi=True)


def create_model(name: str, num_classes: int = 1000, **options) -> nn.Module:
    """Build a registered model with fresh weights.

    ZF-style models (zfnet, alexnet, zfnet_small, alexnet_small) take the Table 3 variants as options:
    ``remove=("conv3", "conv4")``, ``fc=(2048, 2048)``, ``widths=(96, 256, 512, 1024, 512)``, and
    ``input_size``, ``dropout``, ``init``.
    """
    if name not in _REGISTRY:
        raise unknown("model", name, list_models())
    return _REGISTRY[name](num_classes=num_classes, **options)


__all__ = ["REMOVABLE", "VGG16", "ConvNet", "NetSpec", "TorchvisionAlexNet", "check_options", "create_model",
           "list_models"]
