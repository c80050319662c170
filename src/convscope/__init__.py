"""convscope: see inside convolutional networks (Zeiler & Fergus, ECCV 2014)."""

# the analyses, each registering itself in analyses.REGISTRY (the order is the paper's, not this one)
from . import (  # noqa: F401
    ablation,
    analyses,
    correspondence,
    dissect,
    evolution,
    filters,
    invariance,
    occlusion,
    pointing,
    probes,
    sanity,
    transfer,
    units,
    visualize,
)
from .deconvnet import RULES, Projector
from .errors import ConvscopeError
from .imaging import make_grid, to_image
from .layers import layer_names, resolve_layer
from .models import create_model, list_models
from .receptive_field import Box, receptive_field
from .run import Run, attach, open_run

__version__ = "0.1.0"

__all__ = [
    "RULES", "Box", "ConvscopeError", "Projector", "Run", "__version__", "analyses", "attach", "create_model",
    "layer_names", "list_models", "make_grid", "open_run", "receptive_field", "resolve_layer", "to_image",
]
