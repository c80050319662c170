"""ZFNet (paper Fig. 3) and the paper's single-tower AlexNet, with the Table 3 variants, from one spec.

Padding is not stated in the paper (PAPER.md section 1). convscope's choices reproduce Fig. 3's map sizes:
zfnet at 224 px: conv1 7x7 stride 2 padding 1 -> 110, max-pool 3x3 stride 2 in ceil mode (as Caffe pools) -> 55,
conv2 5x5 stride 2 no padding -> 26, pool -> 13, conv3-5 3x3 padding 1 -> 13, pool -> 6 (9216 values).
alexnet at 224 px: conv1 11x11 stride 4 padding 2 -> 55, norm, pool -> 27, conv2 5x5 padding 2 -> 27, norm,
pool -> 13, then as zfnet. The small nets (64 px) keep the strides (16x down to conv3) with "same" padding:
zfnet_small 64 -> 32 -> 16 -> 8 -> 4 -> 4x4 conv3-5 -> 2x2; alexnet_small 64 -> 16 -> 8 -> 8 -> 4 -> 2x2.

Contrast normalisation is Krizhevsky's local response norm (size 5, alpha 1e-4, beta 0.75, k 2), with PyTorch's
(and Caffe's) convention that alpha is divided by the size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvscopeError, check_float, check_int, shown

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
REMOVABLE = ("conv3", "conv4", "fc6", "fc7")


@dataclass(frozen=True)
class NetSpec:
    """Everything that defines a ZF-style net. ``remove`` names layers dropped for the ablation of Table 3."""

    input_size: int = 224
    widths: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256)
    conv1: tuple[int, int, int] = (7, 2, 1)  # kernel, stride, padding
    conv2: tuple[int, int, int] = (5, 2, 0)
    norm_before_pool: bool = False  # AlexNet normalises before pooling, ZFNet after
    fc: tuple[int, int] = (4096, 4096)
    remove: tuple[str, ...] = field(default=())
    dropout: float = 0.5
    init: str = "paper"  # "paper": N(0, 0.01) weights; "he": N(0, 2/fan_in) but fc8; biases 0 in both
    conv1_std: float | None = None  # layer 1's weights from N(0, conv1_std**2) whatever ``init`` says


def _check(spec: NetSpec) -> None:
    """Every option of a spec of the right kind and size (they come from config files too)."""
    check_int(spec.input_size, "input_size", 8, 4096)
    for name, length in (("widths", 5), ("fc", 2), ("conv1", 3), ("conv2", 3)):
        value = getattr(spec, name)
        if not isinstance(value, tuple) or len(value) != length:
            raise ConvscopeError(f"{name} must be {length} whole numbers, got {shown(value)}")
        for v in value:
            check_int(v, f"a value of {name}", 0 if name in ("conv1", "conv2") else 1, 1 << 16)
    for name in ("conv1", "conv2"):
        check_int(getattr(spec, name)[0], f"the kernel of {name}", 1, 64)
        check_int(getattr(spec, name)[1], f"the stride of {name}", 1, 64)
    check_float(spec.dropout, "dropout", 0.0, 1.0, open_hi=True)
    if spec.init not in ("paper", "he"):
        raise ConvscopeError(f"init must be 'paper' or 'he', got {shown(spec.init)}")
    if spec.conv1_std is not None:
        check_float(spec.conv1_std, "conv1_std", 0.0, 1.0, open_lo=True)
    if not isinstance(spec.norm_before_pool, bool):
        raise ConvscopeError(f"norm_before_pool must be true or false, got {shown(spec.norm_before_pool)}")
    if not all(isinstance(r, str) for r in spec.remove):
        raise ConvscopeError(f"remove must name layers, got {shown(spec.remove)}")


class Normalize(nn.Module):
    """Input preprocessing inside the model, so analyses feed images in [0, 1] and projections land in pixel space.

    Paper section 3 subtracts the per-pixel mean image; convscope also divides by the data's pixel std so one
    learning rate suits every data set. Training sets both buffers from the training set; fresh models are the
    identity. At another input size the per-pixel mean falls back to its per-channel mean.
    """

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3, size, size))
        self.register_buffer("std", torch.ones(()))
        self.origins: torch.Tensor | None = None

    @contextmanager
    def cropped(self, origins: torch.Tensor) -> Iterator[None]:
        """For the call, inputs are crops of full-size images with their top-left corners at ``origins`` (N, 2):
        each crop has the matching part of the per-pixel mean subtracted, so it computes what the whole image
        computes there (the scan draws units from crops of their receptive fields)."""
        self.origins = origins
        try:
            yield
        finally:
            self.origins = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = self.mean.shape[-1]
        if (self.origins is not None and len(self.origins) == len(x)
                and all(y + h <= size and x0 + w <= size for y, x0 in self.origins.tolist())):
            mean = torch.stack([self.mean[:, y:y + h, x0:x0 + w] for y, x0 in self.origins.tolist()])
        elif self.mean.shape[-2:] == (h, w):
            mean = self.mean
        else:
            mean = self.mean.mean((-2, -1), keepdim=True)
        return (x - mean) / self.std


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(3, stride=2, ceil_mode=True)


class ContrastNorm(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` computed with shifted sums over channels instead of a 3-D average pool: the same
    numbers (to float rounding), about twice as fast forward and backward on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, n = x.shape[1], self.size
        sq = F.pad(x * x, (0, 0, 0, 0, n // 2, (n - 1) // 2))
        total = sq[:, :c]
        for i in range(1, n):
            total = total + sq[:, i:i + c]
        return x / (self.k + self.alpha / n * total).pow(self.beta)


def _norm() -> nn.LocalResponseNorm:
    return ContrastNorm(5, alpha=1e-4, beta=0.75, k=2.0)


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _pool_out(n: int) -> int:
    out = math.ceil((n - 3) / 2) + 1
    return out - 1 if (out - 1) * 2 >= n else out  # PyTorch's rule: the last window starts inside the input


def plan(spec: NetSpec) -> tuple[list[tuple[int, str, int, tuple[int, int, int]]], int, int]:
    """A spec checked and laid out, without building anything: the kept conv layers (index, name, width, (kernel,
    stride, padding)) and the side and channels of the last feature map. A bad option, or an input too small
    for a layer, is an error here."""
    _check(spec)
    unknown = sorted(set(spec.remove) - set(REMOVABLE), key=str)
    if unknown:
        raise ConvscopeError(f"cannot remove {unknown}; removable layers: {', '.join(REMOVABLE)}")
    convs, size, channels = [], spec.input_size, 3
    for i, (name, width) in enumerate(zip(CONV_LAYERS, spec.widths), start=1):
        if name in spec.remove:
            continue
        k, s, p = spec.conv1 if i == 1 else spec.conv2 if i == 2 else (3, 1, 1)
        size, channels = _conv_out(size, k, s, p), width
        if i in (1, 2, 5) and size >= 1:
            size = _pool_out(size)
        if size < 1:
            raise ConvscopeError(f"input size {spec.input_size} is too small for {name}")
        convs.append((i, name, width, (k, s, p)))
    return convs, size, channels


class ConvNet(nn.Module):
    """A ZF-style network: ``normalize`` (input preprocessing), ``features`` (conv1..conv5 with ReLU, pools,
    norms), then ``classifier`` (fc6, fc7, fc8).

    Module names are readable (``features.conv1``, ``features.relu1``, ``classifier.fc6``, ...); ``paper_layers``
    maps the paper's layer names to the module whose output is that layer's rectified output.
    """

    def __init__(self, spec: NetSpec, num_classes: int):
        super().__init__()
        convs, size, channels = plan(spec)
        check_int(num_classes, "num_classes", 2, 1 << 20)
        self.spec = spec
        self.num_classes = num_classes
        self.input_size = spec.input_size
        self.paper_layers: dict[str, str] = {}
        self.normalize = Normalize(spec.input_size)

        feats: OrderedDict[str, nn.Module] = OrderedDict()
        previous = 3
        for i, name, width, (k, s, p) in convs:
            feats[name] = nn.Conv2d(previous, width, k, stride=s, padding=p)
            feats[f"relu{i}"] = nn.ReLU()
            self.paper_layers[name] = f"features.relu{i}"
            previous = width
            if i in (1, 2):
                if spec.norm_before_pool:
                    feats[f"norm{i}"] = _norm()
                feats[f"pool{i}"] = _pool()
                if not spec.norm_before_pool:
                    feats[f"norm{i}"] = _norm()
            elif i == 5:
                feats["pool5"] = _pool()
        self.features = nn.Sequential(feats)

        head: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        n_in = channels * size * size
        for i, (name, width) in enumerate(zip(("fc6", "fc7"), spec.fc), start=6):
            if name in spec.remove:
                continue
            head[name] = nn.Linear(n_in, width)
            head[f"relu{i}"] = nn.ReLU()
            head[f"drop{i}"] = nn.Dropout(spec.dropout)
            self.paper_layers[name] = f"classifier.relu{i}"
            n_in = width
        head["fc8"] = nn.Linear(n_in, num_classes)
        self.classifier = nn.Sequential(head)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper section 3: weights N(0, 1e-2), biases 0; ``init="he"`` scales the std by fan-in instead, and
        ``conv1_std`` sets layer 1's own."""
        first = next(m for m in self.features if isinstance(m, nn.Conv2d))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if m is first and self.spec.conv1_std is not None:
                    nn.init.normal_(m.weight, std=self.spec.conv1_std)
                elif self.spec.init == "he" and m is not self.classifier.fc8:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                else:  # the output layer stays small under "he" too: initial loss ln(C), not a confident guess
                    nn.init.normal_(m.weight, std=1e-2)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


ZFNET = NetSpec()
ALEXNET = NetSpec(conv1=(11, 4, 2), conv2=(5, 1, 2), norm_before_pool=True)
# The small nets: about a third of the paper's widths, 64 px input, same strides. He initialisation because
# N(0, 0.01) vanishes through seven layers of this width on unit-variance inputs (training stalls); see README.
# Layer 1 starts smaller (std 0.03, a quarter of He's): at He's scale, which renormalisation caps at 0.1, the
# initial noise is still most of each filter after 30 epochs, and Fig. 6's filters look like noise.
ZFNET_SMALL = NetSpec(
    input_size=64, widths=(32, 64, 96, 96, 64), conv1=(7, 2, 3), conv2=(5, 2, 2), fc=(256, 256), init="he",
    conv1_std=0.03,
)
ALEXNET_SMALL = replace(ZFNET_SMALL, conv1=(11, 4, 5), conv2=(5, 1, 2), norm_before_pool=True)
