"""convscope: see inside convolutional networks (Zeiler & Fergus, ECCV 2014)."""

from .errors import ConvscopeError
from .layers import layer_names, resolve_layer
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["ConvscopeError", "__version__", "create_model", "layer_names", "list_models", "resolve_layer"]
