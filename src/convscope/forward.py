"""Running a model up to the layers an analysis probes, and putting back what a run touches.

:func:`run_to_all` runs ``model(x)`` until every probed module has produced its output (at the call asked for:
see :class:`convscope.layers.Site`) and stops there: the rest of the network is not run. :func:`eval_mode`
switches a model to eval mode for the duration and then gives every module its own flag back (a user
fine-tuning with frozen batch norm keeps it frozen).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvscopeError


class _Stop(Exception):
    """Raised by a forward hook once the probed layers have produced their outputs: the rest is not needed."""


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (dropout off, batch norm affine), then every module's own mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def run_to(model: nn.Module, target, x: torch.Tensor, mode: TorchFunctionMode | None = None):
    """Run ``model(x)`` until ``target`` (a module, or a :class:`~convscope.layers.Site`) has produced its output
    and return that output. ``mode`` is active during this forward pass only; hooks are removed on return or
    raise."""
    return run_to_all(model, [target], x, mode)[0]


def run_to_all(model: nn.Module, targets: Sequence, x: torch.Tensor, mode: TorchFunctionMode | None = None,
               keep=None) -> list:
    """Run ``model(x)`` until every target (a module: its first call; or a ``Site``: its ``call``-th call) has
    produced its output; return those outputs in the order given. The rest of the network is not run.

    ``keep(output)``, if given, is applied the moment each output appears and its result is kept instead: a
    reduction there saves memory, and sees the value before a later in-place op (``ReLU(inplace=True)``) could
    change it."""
    sites = [(getattr(t, "module", t), getattr(t, "call", 1)) for t in targets]
    captured: dict[int, torch.Tensor] = {}
    calls = [0] * len(sites)

    def hook(i: int):
        def capture(_module, _inputs, output):
            calls[i] += 1
            if calls[i] == sites[i][1] and i not in captured:
                if not isinstance(output, torch.Tensor):
                    raise ConvscopeError(f"the probed layer returns {type(output).__name__}, not a tensor")
                captured[i] = keep(output) if keep is not None else output
            if len(captured) == len(sites):
                raise _Stop

        return capture

    with ExitStack() as stack:
        for i, (m, _) in enumerate(sites):
            stack.enter_context(m.register_forward_hook(hook(i)))
        stack.enter_context(mode if mode is not None else nullcontext())
        try:
            model(x)
        except _Stop:
            pass
    if len(captured) < len(sites):
        i = next(i for i in range(len(sites)) if i not in captured)
        name = getattr(targets[i], "name", type(sites[i][0]).__name__)
        if calls[i]:
            raise ConvscopeError(f"layer {name!r} ran {calls[i]} time(s) in the forward pass, fewer than the call "
                                 f"{sites[i][1]} asked for")
        raise ConvscopeError(f"the forward pass never reached the probed layer {name!r}")
    return [captured[i] for i in range(len(sites))]


@contextmanager
def exact_float32() -> Iterator[None]:
    """Convolutions and matrix products in IEEE float32 on CUDA for the duration (TF32 off; PyTorch lets cuDNN
    convolve in TF32 by default, about 1e-3 relative, enough to reorder a top-k on near-ties and flip max-pool
    switches), then the caller's settings back. Nothing changes on the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# ------------------------------------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """What images in [0, 1] go through on their way into a model, declared as values (timm's configs carry their
    ``mean`` and ``std`` alike): a per-channel ``mean`` subtracted and ``std`` divided (None: nothing, as for the
    built-in nets, which normalise inside), where they come from (``source``), and whether the images follow the
    model to its device (``follow_device``, as Accelerate's device hooks do: an analysis then runs where the model
    is, whatever device its images come from; gradients still reach an input on the CPU). :meth:`apply` is the
    one place it happens."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""
    follow_device: bool = False

    def apply(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``model``'s first module receives it: normalised, then on the model's device."""
        if self.mean is not None and self.std is not None:
            like = {"dtype": x.dtype, "device": x.device}  # float32 constants, as the values were first stored
            mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1).to(**like)
            std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1).to(**like)
            x = (x - mean) / std
        if self.follow_device:
            param = next(model.parameters(), None)
            if param is not None:
                x = x.to(param.device)
        return x


_DECLARED = "_convscope_preprocessing"  # the attribute that holds it: a deep copy of the model keeps it


def _apply(model: nn.Module, args: tuple):
    declared = getattr(model, _DECLARED, None)
    if declared is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (declared.apply(model, args[0]), *args[1:])


def preprocess(model: nn.Module, **values) -> Preprocessing:
    """Declare (or change) what ``model``'s inputs go through (the fields of :class:`Preprocessing`); the first
    declaration registers the one forward pre-hook that applies it, :func:`unprepare` removes it."""
    declared = replace(preprocessing(model), **values)
    if preprocessing_hook(model) is None:
        model.register_forward_pre_hook(_apply)
    setattr(model, _DECLARED, declared)
    return declared


def preprocessing(model: nn.Module) -> Preprocessing:
    """What ``model``'s inputs go through (nothing declared: ``Preprocessing()``)."""
    return getattr(model, _DECLARED, None) or Preprocessing()


def preprocessing_hook(model: nn.Module) -> int | None:
    """The key of the pre-hook that applies ``model``'s preprocessing (in ``model._forward_pre_hooks``): an engine
    that runs the model's graph itself applies :meth:`Preprocessing.apply` and takes no other hook for it."""
    return next((k for k, hook in model._forward_pre_hooks.items() if hook is _apply), None)


def unprepare(model: nn.Module) -> None:
    """Take ``model``'s preprocessing off: it takes its inputs as given again."""
    key = preprocessing_hook(model)
    if key is not None:
        del model._forward_pre_hooks[key]
    if hasattr(model, _DECLARED):
        delattr(model, _DECLARED)


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` moved to ``device``, its inputs following it there (:class:`Preprocessing`'s ``follow_device``)."""
    model.to(device)
    preprocess(model, follow_device=True)
    return model


def input_channels(model: nn.Module) -> int | None:
    """Channels the first convolution expects, if the model has one."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def check_images(model: nn.Module, images: torch.Tensor) -> None:
    """A batch the model can take: a finite float (N, C, H, W) tensor with the model's input channels."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = getattr(images, "dtype", type(images).__name__)
        raise ConvscopeError(f"images must be a floating point tensor, got {kind}")
    if images.dim() != 4:
        raise ConvscopeError(f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}")
    channels = input_channels(model)
    if channels is not None and images.shape[1] != channels:
        raise ConvscopeError(f"the model expects {channels} input channels, images have {images.shape[1]}")
    if not torch.isfinite(images).all():
        raise ConvscopeError("images contain NaN or infinite values")


__all__ = ["Preprocessing", "check_images", "eval_mode", "exact_float32", "input_channels", "on_device", "preprocess",
           "preprocessing", "preprocessing_hook", "run_to", "run_to_all", "unprepare"]
