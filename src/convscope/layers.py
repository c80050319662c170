"""Naming the layer to probe: a module name from ``model.named_modules()``, or a paper alias.

Built-in models carry ``paper_layers``, a mapping from the paper's names (conv1..conv5, fc6, fc7) to the module
whose output is that layer's rectified output (PAPER.md section 1). Any other ``nn.Module`` is addressed by
module names only.
"""

from __future__ import annotations

from torch import nn

from .errors import unknown


def layer_names(model: nn.Module) -> list[str]:
    """Every name :func:`resolve_layer` accepts: paper aliases first, then module names."""
    aliases = list(getattr(model, "paper_layers", {}))
    return aliases + [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """Return ``(module_name, module)`` for a paper alias or a module name; unknown names list the valid ones."""
    name = getattr(model, "paper_layers", {}).get(layer, layer)
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise unknown("layer", layer, layer_names(model))
    return name, modules[name]
