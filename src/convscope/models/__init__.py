"""The model registry: ``create_model(name, num_classes)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from ..errors import ConvscopeError, unknown
from .convnet import ALEXNET, ALEXNET_SMALL, REMOVABLE, ZFNET, ZFNET_SMALL, ConvNet, NetSpec
from .tvlayout import VGG16, TorchvisionAlexNet

_SPECS = {"zfnet": ZFNET, "alexnet": ALEXNET, "zfnet_small": ZFNET_SMALL, "alexnet_small": ALEXNET_SMALL}


def _convnet(spec: NetSpec) -> Callable[..., nn.Module]:
    def make(num_classes: int = 1000, **variant) -> nn.Module:
        bad = sorted(set(variant) - set(NetSpec.__dataclass_fields__))
        if bad:
            raise ConvscopeError(f"unknown model options {bad}; valid: {', '.join(NetSpec.__dataclass_fields__)}")
        for key in ("widths", "fc", "remove", "conv1", "conv2"):
            if key in variant:
                if not isinstance(variant[key], list | tuple):
                    raise ConvscopeError(f"model option {key} must be a list, got {variant[key]!r:.40}")
                variant[key] = tuple(variant[key])
        return ConvNet(replace(spec, **variant), num_classes)

    return make


_REGISTRY: dict[str, Callable[..., nn.Module]] = {name: _convnet(spec) for name, spec in _SPECS.items()}
_REGISTRY["vgg16"] = VGG16
_REGISTRY["alexnet_torchvision"] = TorchvisionAlexNet


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 1000, **options) -> nn.Module:
    """Build a registered model with fresh weights.

    ZF-style models (zfnet, alexnet, zfnet_small, alexnet_small) take the Table 3 variants as options:
    ``remove=("conv3", "conv4")``, ``fc=(2048, 2048)``, ``widths=(96, 256, 512, 1024, 512)``, and
    ``input_size``, ``dropout``, ``init``.
    """
    if name not in _REGISTRY:
        raise unknown("model", name, list_models())
    return _REGISTRY[name](num_classes=num_classes, **options)


__all__ = ["REMOVABLE", "VGG16", "ConvNet", "NetSpec", "TorchvisionAlexNet", "create_model", "list_models"]
