"""Projecting an activation back to pixel space: the deconvnet of Zeiler & Fergus, section 2.1.

To examine one activation, every other activation of the probed layer is set to zero and the result is passed
down through the network: unpool with the switches of the forward pass, rectify, filter with the transposed
filters; repeated down to the pixels. Springenberg et al. (2014) showed that this is a backward pass in which
the ReLU's backward is ``relu(grad_out)`` and ignores the forward mask. convscope therefore runs ONE engine,
a backward pass of autograd from the probed layer to the input, and the rules differ only in the ReLU's
backward:

=============  ===========================================  ===============================
rule           ReLU backward                                reference
=============  ===========================================  ===============================
``deconvnet``  ``relu(grad_out)``                           Zeiler & Fergus 2014, sec. 2.1
``guided``     ``relu(grad_out) * (input > 0)``             Springenberg et al. 2014
``gradient``   ``grad_out * (input > 0)`` (plain gradient)  Simonyan et al. 2013
=============  ===========================================  ===============================

Every other layer takes its transpose (its true input gradient), which is what the paper describes and what
Captum does:

- convolution and linear layers: the transposed (flipped) filters; biases never enter a backward pass;
- max pooling: unpooling through the switches recorded in the forward pass. With overlapping pools (3x3,
  stride 2) a location can be the switch of two windows; autograd's max-pool backward scatter-ADDS there,
  which is the transpose of pooling (a scatter that overwrites would be wrong);
- average pooling: its transpose, each value spread evenly over its window;
- local response (contrast) normalisation: its true gradient (Jacobian transpose), written out in one fused
  backward for ``nn.LocalResponseNorm`` modules (and subclasses) and ``F.local_response_norm`` calls. The
  paper does not say what it did; this choice makes convscope equal to Captum's ``NeuronDeconvolution`` on
  ZFNet;
- batch norm: the model runs in eval mode, where batch norm is an affine map; the backward multiplies by its
  per-channel scale ``gamma / sqrt(var + eps)`` and drops the shift;
- dropout: the model runs in eval mode, where dropout is the identity.

For the call the model is put in eval mode and restored afterwards. ReLUs are found wherever they are: modules
(``nn.ReLU``, also ``inplace=True``) and functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``,
``relu_``) are all rerouted, by a ``TorchFunctionMode`` active during the forward pass only, to one autograd
function whose backward applies the rule. Other nonlinearities (sigmoid, tanh, GELU, SiLU, ELU, LeakyReLU,
ReLU6, softplus, ...) have no deconvnet or guided rule: under those rules they raise :class:`ConvscopeError`
naming the module that calls them and its class, instead of silently falling back to the gradient, unless the
caller asks for that fallback (``nonlinearities="gradient"``: what Captum does silently). ``gradient`` accepts
anything differentiable.

The forward pass stops at the probed layer. Only the gradient with respect to the input is computed (never
weight gradients), hooks and modes are removed when the call ends, also when it raises, and the calls work
inside the caller's ``torch.no_grad()`` or ``torch.inference_mode()``: the engine enables gradients itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvscopeError, unknown
from .forward import check_images, eval_mode, input_channels, run_to
from .layers import site

RULES = ("deconvnet", "guided", "gradient")
MODES = ("max", "map")
NONLINEARITIES = ("error", "gradient")

# Elementwise nonlinearities that only the plain gradient can pass (no rectification rule exists for them).
_UNSUPPORTED = frozenset(
    "sigmoid expit tanh gelu silu elu selu celu leaky_relu softplus mish hardswish hardsigmoid relu6 "
    "hardtanh prelu rrelu logsigmoid log_sigmoid softsign tanhshrink threshold glu hardshrink softshrink "
    "softmax log_softmax".split()
)


class _RuledReLU(torch.autograd.Function):
    """ReLU whose backward applies a projection rule; the forward is the usual ReLU (in place if asked)."""

    @staticmethod
    def forward(ctx, x, rule, inplace):
        if inplace:
            ctx.mark_dirty(x)
            out = torch.relu_(x)
        else:
            out = torch.relu(x)
        ctx.rule = rule
        if rule != "deconvnet":
            # input > 0 exactly where output > 0, so the output is enough to rebuild the forward mask.
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.rule == "deconvnet":
            return grad.clamp(min=0), None, None
        (out,) = ctx.saved_tensors
        if ctx.rule == "guided":
            grad = grad.clamp(min=0)
        return torch.ops.aten.threshold_backward(grad, out, 0), None, None


def _window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Sum over channels c-before..c+after (zero beyond the ends) by shifted in-place adds: no 3-D pooling."""
    total = t.clone()
    for i in range(1, before + 1):
        total[:, i:] += t[:, :-i]
    for i in range(1, after + 1):
        total[:, :-i] += t[:, i:]
    return total


class _LocalResponseNorm(torch.autograd.Function):
    """``F.local_response_norm`` on (N, C, H, W) with its true gradient written out: one fused backward
    instead of autograd through a dozen full-size temporaries (the slowest part of a ZFNet projection on
    the CPU)."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        before, after = size // 2, (size - 1) // 2
        d = _window_sum(x * x, before, after).mul_(alpha / size).add_(k)
        scale = d.pow(-beta)
        out = x * scale
        # y_c = x_c d_c^-b: dy_c/dx_j = [c=j] d_j^-b - (2 a b / n) x_j * y_c / d_c for j in c's window
        ctx.save_for_backward(x, scale, out / d)
        ctx.params = before, after, alpha / size * 2 * beta
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, y_over_d = ctx.saved_tensors
        before, after, factor = ctx.params
        cross = _window_sum(grad * y_over_d, after, before)
        return torch.addcmul(grad * scale, x, cross, value=-factor), None, None, None, None


def _lrn_forward(module: nn.LocalResponseNorm):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return type(module).forward(module, x)
        return _LocalResponseNorm.apply(x, module.size, module.alpha, module.beta, module.k)

    return forward


@contextmanager
def _fused_lrn(model: nn.Module) -> Iterator[None]:
    """Route every LocalResponseNorm module (or subclass) through :class:`_LocalResponseNorm` for the call."""
    patched = [
        m for m in model.modules() if isinstance(m, nn.LocalResponseNorm) and "forward" not in m.__dict__
    ]
    try:
        for m in patched:
            m.forward = _lrn_forward(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


class _Count(TorchFunctionMode):
    """Counts the calls of nonlinearities that only the plain gradient can pass."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "").rstrip("_")
        if name in _UNSUPPORTED:
            self.found[name] = self.found.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def unruled_nonlinearities(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The nonlinearities other than ReLU that ``model(x)`` calls (name -> calls): deconvnet and guided
    backpropagation have no rule for them, so a projection under those rules stops on them unless they pass by
    their gradient (``nonlinearities="gradient"``)."""
    counter = _Count()
    with torch.no_grad(), eval_mode(model), counter:
        model(x)
    return counter.found


def nonlinearities_note(model: nn.Module, size: int, passed: bool = False) -> str | None:
    """What to say of a model's nonlinearities other than ReLU (found in one forward pass of a blank ``size``-px
    image) before any projection stops on them; None: it calls none. ``passed``: the run passes them by their
    gradient already."""
    param = next(model.parameters(), None)
    like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
    unruled = unruled_nonlinearities(model, torch.zeros(1, input_channels(model) or 3, size, size, **like))
    if not unruled:
        return None
    calls = ", ".join(f"{name} ({n} call{'s' * (n != 1)})" for name, n in sorted(unruled.items()))
    said = f"this model calls nonlinearities other than ReLU: {calls}. deconvnet and guided backpropagation have "
    if passed:
        return said + "rules for ReLU only; this run passes the others by their gradient, as every figure says"
    return said + ("rules for ReLU only, so their projections will stop there: attach with --nonlinearities "
                   "gradient to pass them by their gradient (said on every figure), or project with --rule gradient")


class _Reroute(TorchFunctionMode):
    """During the forward: every ReLU call goes to :class:`_RuledReLU`; another nonlinearity raises, or passes by
    its gradient when ``nonlinearities="gradient"``."""

    def __init__(self, rule: str, nonlinearities: str, where: list[tuple[str, nn.Module]]):
        super().__init__()
        self.rule, self.nonlinearities, self.where = rule, nonlinearities, where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("relu", "relu_"):
            inplace = name == "relu_" or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return _RuledReLU.apply(args[0], self.rule, inplace)
        if name == "local_response_norm" and args[0].dim() == 4:
            bound = dict(zip(("input", "size", "alpha", "beta", "k"), args), **kwargs)
            return _LocalResponseNorm.apply(
                args[0], bound["size"], bound.get("alpha", 1e-4), bound.get("beta", 0.75), bound.get("k", 1.0)
            )
        if self.rule != "gradient" and self.nonlinearities == "error" and name.rstrip("_") in _UNSUPPORTED:
            module, owner = self.where[-1] if self.where else ("", None)
            kind = type(owner).__name__ if owner is not None else "?"
            raise ConvscopeError(
                f"rule {self.rule!r} has no rule for the nonlinearity of module {module or '<model>'!r} ({kind}, "
                f"which calls {name}): only ReLU has a deconvnet or guided rule. Pass nonlinearities='gradient' "
                "(--nonlinearities gradient) to let it pass by its plain gradient, as Captum does, or use "
                "rule='gradient'"
            )
        return func(*args, **kwargs)


def _track_modules(model: nn.Module, stack: ExitStack) -> list[tuple[str, nn.Module]]:
    """Hooks that keep the qualified name and the module running now, to name it in errors."""
    where: list[tuple[str, nn.Module]] = []

    def enter(name: str, module: nn.Module):
        return lambda *_: where.append((name, module))  # returns None: the module's input is left alone

    def leave(*_) -> None:
        where.pop()

    for name, m in model.named_modules():
        stack.enter_context(m.register_forward_pre_hook(enter(name, m)))
        stack.enter_context(m.register_forward_hook(leave, always_call=True))
    return where


class Projector:
    """Project activations of any layer back to pixel space (paper section 2.1) with one of :data:`RULES`.

    ``nonlinearities``: what ``deconvnet`` and ``guided`` do with a nonlinearity other than ReLU (ReLU6,
    LeakyReLU, SiLU, GELU, hardswish, ...), for which neither has a rule: ``"error"`` (default) raises naming
    the module; ``"gradient"`` passes it by its plain gradient (what Captum does without saying so).
    """

    def __init__(self, model: nn.Module, rule: str = "deconvnet", nonlinearities: str = "error"):
        if rule not in RULES:
            raise unknown("rule", rule, RULES)
        if nonlinearities not in NONLINEARITIES:
            raise unknown("nonlinearities option", nonlinearities, NONLINEARITIES)
        self.model, self.rule, self.nonlinearities = model, rule, nonlinearities

    @contextmanager
    def _forward(self, images: torch.Tensor, layer: str):
        """Yield ``(input leaf, probed output)`` with the graph between them built under the rule."""
        target = site(self.model, layer)
        check_images(self.model, images)
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(self.model):
            # Channels-last: oneDNN's convolutions, above all the 3-channel input gradient of conv1, run
            # about 1.5x faster in it on the CPU. An in-place op on this leaf raises: caller's data is safe.
            x = images.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
            with ExitStack() as hooks, _fused_lrn(self.model):
                where = _track_modules(self.model, hooks) if self.rule != "gradient" else []
                out = run_to(self.model, target, x, _Reroute(self.rule, self.nonlinearities, where))
            if not out.requires_grad:
                raise ConvscopeError(f"layer {layer!r} does not depend on the input")
            yield x, out

    def project(
        self,
        images: torch.Tensor,
        layer: str,
        channel: int | torch.Tensor | None = None,
        position: tuple[int, int] | None = None,
        mode: str = "max",
        grad_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One projection per image, shaped like ``images`` (N, C, H, W); one forward and one backward pass.

        Seeds (paper section 2.1: all other activations of the layer set to zero):
        - ``mode="max"`` (default): the strongest activation of map ``channel``, seeded with its value;
        - ``position=(row, col)``: that activation of map ``channel``, seeded with its value;
        - ``mode="map"``: the whole map ``channel``, seeded with the map itself.
        ``channel`` is an int (every image) or a 1-D tensor with one channel per image; ``None`` picks, per
        image, the map holding the layer's strongest activation (at ``position`` if given). For fully
        connected layers (N, C) the "map" is the unit itself and ``position`` must be None. ``grad_output``,
        shaped like the layer's output, is used as given instead of any of these seeds.
        """
        if mode not in MODES:
            raise unknown("mode", mode, MODES)
        if grad_output is not None and (channel is not None or position is not None or mode != "max"):
            raise ConvscopeError("grad_output replaces channel, position and mode: give one or the other")
        with self._forward(images, layer) as (x, out):
            if grad_output is None:
                seed = _seed(out.detach(), channel, position, mode)
            elif tuple(grad_output.shape) != tuple(out.shape):
                raise ConvscopeError(
                    f"grad_output has shape {tuple(grad_output.shape)}, "
                    f"layer {layer!r} outputs {tuple(out.shape)}"
                )
            else:
                seed = grad_output.to(out)
            (grad,) = torch.autograd.grad(out, x, seed)
        return grad.detach().contiguous()

    def project_at(
        self, images: torch.Tensor, layer: str, channels: torch.Tensor, positions: torch.Tensor,
        owners: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections of single activations, each seeded with its value (section 2.1): map ``channels[i]`` at
        ``positions[i]`` (row, col) of image ``owners[i]`` (default: of image i, one activation per image).
        One forward pass of the images, and one backward pass per activation an image holds at most: each image
        gives one of its activations to each backward pass, so several activations of one image share its
        forward pass (one forward, many cotangents). Returns the projections (one per activation, image-shaped)
        and the seeded values, so that a caller who cropped the images can check that the crop reproduced the
        activation it meant to project."""
        with self._forward(images, layer) as (x, out):
            act = out.detach()
            if act.dim() != 4:
                raise ConvscopeError(f"layer {layer!r} has no feature maps (output {tuple(act.shape)}): "
                                     "project_at seeds one position of a map")
            n, c, h, w = act.shape
            chans, pos = torch.as_tensor(channels).long().cpu(), torch.as_tensor(positions).long().cpu()
            owners = torch.arange(n) if owners is None else torch.as_tensor(owners).long().cpu()
            m = len(owners)
            if chans.shape != (m,) or pos.shape != (m, 2) or owners.dim() != 1:
                raise ConvscopeError(f"give one channel and one (row, col) per activation: {m} activations, "
                                     f"channels {tuple(chans.shape)}, positions {tuple(pos.shape)}")
            if m and (owners.min() < 0 or owners.max() >= n):
                raise ConvscopeError(f"an activation's image is out of range: {n} images")
            _check_channels(chans, c)
            if ((pos < 0) | (pos >= torch.tensor([h, w]))).any():
                raise ConvscopeError(f"a position is out of range: the layer's maps are {h}x{w}")
            order = torch.sort(owners, stable=True).indices  # each image's activations, numbered 0, 1, ...
            counts = torch.bincount(owners, minlength=n)
            turn = torch.empty(m, dtype=torch.long)
            turn[order] = torch.arange(m) - (counts.cumsum(0) - counts)[owners[order]]
            rows, chans, r, q = (t.to(act.device) for t in (owners, chans, pos[:, 0], pos[:, 1]))
            values = act[rows, chans, r, q]
            grads = torch.empty((m, *x.shape[1:]), dtype=x.dtype, device=x.device)
            rounds = int(turn.max()) + 1 if m else 0
            for k in range(rounds):
                mine = (turn == k).nonzero().flatten().to(act.device)
                seed = torch.zeros_like(act)
                seed[rows[mine], chans[mine], r[mine], q[mine]] = values[mine]
                (grad,) = torch.autograd.grad(out, x, seed, retain_graph=k + 1 < rounds)
                grads[mine] = grad[rows[mine]]
        return grads.detach().contiguous(), values.clone()

    def project_channels(
        self,
        image: torch.Tensor,
        layer: str,
        channels: Iterable[int] | torch.Tensor,
        mode: str = "max",
        chunk_size: int = 64,
    ) -> torch.Tensor:
        """Project many maps of ONE image (paper Fig. 2, one image): (len(channels), C, H, W).

        One forward pass is shared by all maps; each map is seeded as in :meth:`project` (``mode="max"``: its
        strongest activation; ``"map"``: the whole map). The backward passes run ``chunk_size`` cotangents at
        a time, so memory stays bounded by ``chunk_size`` projections.
        """
        if mode not in MODES:
            raise unknown("mode", mode, MODES)
        if chunk_size < 1:
            raise ConvscopeError(f"chunk_size must be at least 1, got {chunk_size}")
        if isinstance(image, torch.Tensor) and image.dim() == 3:
            image = image.unsqueeze(0)
        if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] != 1:
            raise ConvscopeError(f"project_channels takes one image, got a batch of {image.shape[0]}")
        chans = torch.as_tensor(list(channels) if not isinstance(channels, torch.Tensor) else channels)
        if chans.dim() != 1 or chans.numel() == 0:
            raise ConvscopeError("channels must be a non-empty 1-D sequence of channel indices")
        results = []
        with self._forward(image, layer) as (x, out):
            act = out.detach()
            _check_channels(chans, act.shape[1])
            for start in range(0, len(chans), chunk_size):
                chunk = chans[start : start + chunk_size]
                seeds = _seed(act.expand(len(chunk), *act.shape[1:]), chunk, None, mode)
                grads = torch.empty((len(chunk), *x.shape[1:]), dtype=x.dtype, device=x.device)
                # One backward per cotangent over the one shared graph. is_grads_batched was slower (vmap
                # falls back to a per-example loop for the conv and max-pool backward); re-running the forward
                # at batch size k breaks the one-forward contract and measured no faster on an idle CPU.
                for i in range(len(chunk)):
                    grads[i] = torch.autograd.grad(out, x, seeds[i : i + 1], retain_graph=True)[0][0]
                results.append(grads)
        return torch.cat(results)


def _check_channels(channels: torch.Tensor, n_channels: int) -> None:
    if channels.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
        raise ConvscopeError("channel indices must be integers")
    bad = channels[(channels < 0) | (channels >= n_channels)]
    if bad.numel():
        raise ConvscopeError(
            f"channel {int(bad[0])} out of range: the layer has {n_channels} channels (0..{n_channels - 1})"
        )


def _seed(act: torch.Tensor, channel, position: Sequence[int] | None, mode: str) -> torch.Tensor:
    """The cotangent of section 2.1: the selected activation(s) with their values, everything else zero."""
    n = act.shape[0]
    if act.dim() not in (2, 4):
        raise ConvscopeError(
            f"cannot select a channel in an output of shape {tuple(act.shape)}; pass grad_output instead"
        )
    if act.dim() == 2 and position is not None:
        raise ConvscopeError("position is meaningless for a fully connected layer (N, C): leave it None")
    if position is not None:
        if mode == "map":
            raise ConvscopeError("position selects one activation; mode='map' selects the whole map")
        if len(position) != 2:
            raise ConvscopeError(f"position must be (row, col), got {position!r}")
        r, c = (int(p) for p in position)
        h, w = act.shape[2:]
        if not (0 <= r < h and 0 <= c < w):
            raise ConvscopeError(f"position {(r, c)} out of range: the layer's maps are {h}x{w}")
    if channel is not None:
        chans = torch.as_tensor(channel, device=act.device)
        if chans.dim() == 0:
            chans = chans.expand(n)
        elif chans.dim() != 1 or len(chans) != n:
            raise ConvscopeError(
                f"channel must be an int or a 1-D tensor of {n} channels, got shape {tuple(chans.shape)}"
            )
        _check_channels(chans, act.shape[1])
    elif act.dim() == 2:
        chans = act.argmax(1)
    elif position is not None:
        chans = act[:, :, r, c].argmax(1)
    else:  # the map holding the layer's strongest activation
        chans = act.flatten(1).argmax(1) // act[0, 0].numel()
    rows = torch.arange(n, device=act.device)
    seed = torch.zeros_like(act)
    maps = act[rows, chans]
    if act.dim() == 2 or mode == "map":
        seed[rows, chans] = maps
    elif position is not None:
        seed[rows, chans, r, c] = maps[:, r, c]
    else:
        best = maps.flatten(1).argmax(1)
        rr, cc = best // maps.shape[2], best % maps.shape[2]
        seed[rows, chans, rr, cc] = maps[rows, rr, cc]
    return seed


def gradient_note(rule: str, nonlinearities: str) -> str | None:
    """What a figure must say when its projections passed nonlinearities other than ReLU by their gradient."""
    if nonlinearities == "gradient" and rule != "gradient":
        return f"{rule}: nonlinearities other than ReLU passed by their gradient (--nonlinearities gradient)"
    return None

__all__ = ["MODES", "NONLINEARITIES", "RULES", "Projector", "gradient_note", "nonlinearities_note",
           "unruled_nonlinearities"]
