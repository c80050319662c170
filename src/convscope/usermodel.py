"""The user's own model: specs that build it, its input normalisation, and the check that it takes the images.

A model is named by a **spec**: a built-in name (``convscope models``), ``package.module:callable`` or
``path/to/file.py:callable``, a callable that returns an ``nn.Module``, with keyword arguments
(``--model-arg key=value``, the value read as JSON where it parses). Its weights come from the user's file
(:mod:`convscope.weights`), its images from any data set convscope reads. The run directory records all of it in
``attach.json`` (the spec, the weights file and its SHA-256, the data, the input normalisation, the class
names), so that every analysis command reopens the same model later, and refuses weights that changed since.

Preprocessing: analyses feed images in [0, 1] and show projections in pixel space. A model trained on
normalised inputs gets its normalisation (``--normalize imagenet`` or six numbers) declared as values
(:class:`convscope.forward.Preprocessing`), applied before its first module, so module names stay the user's
own and the projections pass through the normalisation back to pixels.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConvscopeError
from .forward import eval_mode, preprocess, preprocessing
from .models import create_model, list_models

FORMAT = "convscope-attach-1"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Image sides tried when a model refuses the asked size, to say which it takes.
PROBE_SIZES = (32, 64, 96, 128, 224, 227, 256, 299)


# --------------------------------------------------------------------------------------------- model specs


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["depth=18", "name=small"]`` -> ``{"depth": 18, "name": "small"}``: values are JSON where they parse."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConvscopeError(f"--model-arg takes key=value with a Python name as key, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _import(spec: str):
    """The object a ``module:attr`` or ``file.py:attr`` spec names."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:

        raise ConvscopeError(f"model {spec!r} is neither a built-in model ({', '.join(list_models())}) nor a "
                             "spec: package.module:callable or path/to/file.py:callable")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target).expanduser()
            if not path.is_file():
                raise ConvscopeError(f"model spec {spec!r}: no file {str(path)!r}")
            name = f"convscope_user_model_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look their module up here
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(target)
    except ConvscopeError:
        raise
    except Exception as e:  # the user's code may raise anything while it is imported
        raise ConvscopeError(f"cannot import the model spec {spec!r}: {type(e).__name__}: {e}") from None
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConvscopeError(f"{target!r} has no {attr!r}; its callables: {', '.join(found[:20]) or 'none'}")
    return getattr(module, attr)


def build_model(spec: str, args: dict[str, Any] | None = None) -> nn.Module:
    """A fresh model from a spec (see the module doc) and its keyword arguments."""

    args = dict(args or {})
    if spec in list_models():
        return create_model(spec, **args)
    factory = _import(spec)
    if not callable(factory):
        raise ConvscopeError(f"model spec {spec!r} names a {type(factory).__name__}, not a callable")
    try:
        model = factory(**args)
    except Exception as e:
        raise ConvscopeError(f"model spec {spec!r} raised {type(e).__name__} when called with {args}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConvscopeError(f"model spec {spec!r} returned {model!r:.60} ({type(model).__name__}), not an nn.Module")
    return model


def accepts(spec: str, arg: str) -> bool:
    """Whether the spec's callable takes keyword ``arg`` (a built-in model takes ``num_classes``)."""

    if spec in list_models():
        return arg == "num_classes"
    try:
        params = inspect.signature(_import(spec)).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """The output count of a built-in model from its weights: the rows of the last 2-D weight."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(weights[-1].shape[0]) if weights else None


# ------------------------------------------------------------------------------------------- normalisation


def parse_normalize(value: str | Sequence[float] | None) -> tuple[list[float], list[float]] | None:
    """``"imagenet"``, ``"none"``/None, or six numbers ``MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() == "imagenet":
        return list(IMAGENET[0]), list(IMAGENET[1])
    try:
        numbers = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 6 or not all(map(torch.isfinite, torch.tensor(numbers))) or min(numbers[3:]) <= 0:
        raise ConvscopeError(f"--normalize takes 'imagenet', 'none' or six numbers MEAN_R,MEAN_G,MEAN_B,STD_R,"
                             f"STD_G,STD_B (positive stds), got {value!r}")
    return numbers[:3], numbers[3:]


def add_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float], source: str = "") -> nn.Module:
    """Declare ``model``'s input normalisation (:func:`convscope.forward.preprocess`: values, applied in one place
    and removable); ``source`` says where the numbers come from."""
    preprocess(model, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), source=source)
    return model


def input_normalization(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (mean, std) per channel a model applies to its [0, 1] input: its declared preprocessing, or a built-in
    model's own ``normalize`` module; None for neither."""
    declared = preprocessing(model)
    if declared.mean is not None and declared.std is not None:
        return torch.tensor(declared.mean), torch.tensor(declared.std)
    norm = getattr(model, "normalize", None)
    if isinstance(getattr(norm, "mean", None), torch.Tensor) and norm.mean.dim() == 3:
        return norm.mean.mean((-2, -1)), norm.std.flatten().expand(norm.mean.shape[0])
    return None


# ---------------------------------------------------------------------------------------- the input check


def check_input(model: nn.Module, image_size: int, channels: int = 3) -> torch.Size:
    """Run one blank image of ``image_size`` through the model; return the output's shape. A model that refuses
    it gets an error that says which sizes it takes."""

    def forward(size: int):
        param = next(model.parameters(), None)
        x = torch.zeros(1, channels, size, size, dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else "cpu")
        with torch.no_grad(), eval_mode(model):
            return model(x)

    try:
        out = forward(image_size)
    except Exception as e:
        expected = getattr(model, "input_size", None)
        if isinstance(expected, int):
            hint = f"it is built for {expected} px images: pass --image-size {expected}"
        else:
            works = []
            for size in PROBE_SIZES:
                try:
                    forward(size)
                    works.append(size)
                except Exception:
                    continue
            hint = (f"it takes {', '.join(map(str, works))} px (tried {', '.join(map(str, PROBE_SIZES))}): pass "
                    f"--image-size {works[0]}" if works else "none of the sizes tried worked "
                    f"({', '.join(map(str, PROBE_SIZES))} px)")
        raise ConvscopeError(f"the model cannot take {image_size}x{image_size} images "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConvscopeError(f"the model returns {shape} for one image; convscope reads a model's output as "
                             "logits of shape (batch, classes): wrap it so that it returns them")
    return out.shape


def read_classes(path: str | Path) -> list[str]:
    """Class names from a file: a JSON list, or one name per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvscopeError(f"cannot read the classes file {str(path)!r} ({e})") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as e:
            raise ConvscopeError(f"classes file {str(path)!r} is not valid JSON ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConvscopeError(f"classes file {str(path)!r} must hold a JSON list of strings")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


__all__ = ["FORMAT", "IMAGENET", "accepts", "add_normalization", "build_model",
           "check_input", "infer_num_classes", "input_normalization", "parse_model_args", "parse_normalize",
           "read_classes"]
