"""Architecture diagnosis of layers 1 and 2: paper Fig. 6 (section 4.1), as numbers and a figure.

The paper looks at pictures and says three things; this module measures each:

- Fig. 6(a): without filter renormalisation "a few layer-1 filters dominate" -> :attr:`FilterStats.dominance`,
  the largest filter RMS over the median filter RMS.
- Fig. 6(b) vs (c): AlexNet's layer 1 (11x11, stride 4) is "a mix of extremely high and low frequency
  information, with little coverage of the mid frequencies" and has "dead" features; ZF's (7x7, stride 2) is
  more distinctive -> :attr:`FilterStats.dead_fraction` (and the data-based :attr:`FilterStats.inactive_fraction`)
  and :attr:`FilterStats.band_fractions`, the share of filter energy at low, mid and high spatial frequencies.
- Fig. 6(d) vs (e): AlexNet's layer-2 projections show "aliasing artifacts caused by the large stride 4"; ZF's
  are clean -> :func:`aliasing`, the share of layer-2 projection energy above the first layer's sampling limit.

Computation and writing are separate: :func:`filter_stats`, :func:`aliasing`, :func:`diagnose`, :func:`compare`
and :func:`filters_figure` compute; :func:`save_diagnosis` writes, through :mod:`convscope.artifacts`. Over a run,
:func:`compute` diagnoses the run's model beside the runs it is compared with (layer 1 is the first
convolution, whatever its name) and :func:`write_filters` writes Fig. 6.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import artifacts
from .analyses import Analysis, figure_files, register
from .deconvnet import RULES, Projector, gradient_note
from .errors import ConvscopeError, unknown
from .findings import Finding, bootstrap_contrast, difference_contrast, finding
from .forward import eval_mode, run_to
from .imaging import make_grid, to_image
from .layers import paper_names, resolve_layer, site
from .layout import Layout
from .run import open_run

if TYPE_CHECKING:
    from .run import Run

# Radial frequency bands in cycles/pixel: low [0, 1/6), mid [1/6, 1/3), high [1/3, sqrt(2)/2]. Thirds of the
# Nyquist limit 1/2; "high" also takes the diagonal corners beyond 1/2.
BAND_EDGES = (1 / 6, 1 / 3)
BANDS = ("low", "mid", "high")
# 48 puts both band edges on DFT bins (8/48, 16/48) and holds the paper's 7x7 and 11x11 filters alike.
FFT_SIZE = 48
NORMALIZE = ("global", "filter")


# --------------------------------------------------------------------------------------------------- layer 1


def _first_conv(model: nn.Module, layer: str | None) -> bool:
    """Whether ``layer`` means the model's first convolution: None, or ``conv1`` where no module or alias has
    that name."""
    return layer is None or (layer == "conv1" and not paper_names(model) and "conv1" not in dict(model.named_modules()))


def conv_module(model: nn.Module, layer: str | None = "conv1") -> nn.Conv2d:
    """The ``nn.Conv2d`` behind ``layer``: the module itself, or for a paper alias (whose probed module is the
    ReLU after the convolution) the last convolution registered before it. ``None`` -- and ``"conv1"`` on a model
    without paper aliases -- means the model's first convolution, the paper's layer 1."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConvscopeError("the model has no nn.Conv2d layer: filter diagnosis needs convolution filters")
    if _first_conv(model, layer):
        return convs[0][1]
    name, module = resolve_layer(model, layer)
    if isinstance(module, nn.Conv2d):
        return module
    order = [n for n, _ in model.named_modules()]
    before = [m for n, m in convs if order.index(n) < order.index(name)]
    if not before:
        raise ConvscopeError(f"no convolution precedes layer {layer!r}; name an nn.Conv2d module instead")
    return before[-1]


def filter_rms(weight: torch.Tensor) -> torch.Tensor:
    """Root mean square of each filter over its input channels and taps, (C_out,): the quantity that the
    paper's renormalisation clips to 0.1 (section 3, ``train.renormalize_filters_``)."""
    return weight.detach().to(torch.float64).flatten(1).pow(2).mean(1).sqrt()


def band_energy(weight: torch.Tensor, fft_size: int = FFT_SIZE) -> torch.Tensor:
    """Energy of each filter in the low, mid and high radial frequency bands, (C_out, 3), float64.

    Each filter (C_in, k, k) is zero-padded to ``fft_size`` x ``fft_size`` so that filters of any size are
    sampled on one frequency grid (a 7x7 and an 11x11 filter compare like for like), transformed by a 2-D DFT,
    and its power ``|F(fy, fx)|^2`` summed over input (colour) channels. Bins are grouped by the radial frequency
    ``r = sqrt(fx^2 + fy^2)`` in cycles/pixel: low ``r < 1/6``, mid ``1/6 <= r < 1/3``, high ``r >= 1/3`` (up
    to the corners, ``sqrt(2)/2``). The DC bin is in "low": a colour blob is low-frequency information in the
    paper's sense; its share is reported separately by :func:`dc_fraction`. The three columns sum to
    ``fft_size**2 * sum(w**2)`` (Parseval).

    This is the filter's true frequency response, support edges included: a small filter cannot be band-limited,
    so even a constant 7x7 filter puts 17 % of its energy above 1/6 (11x11: 10 %), and a 7x7 cosine of period
    10 px about 26 %. Compare filters of one size, or read differences between sizes with that in mind.
    """
    w = weight.detach().to(torch.float64)
    if w.dim() != 4:
        raise ConvscopeError(f"filters must be (C_out, C_in, kh, kw), got shape {tuple(w.shape)}")
    if max(w.shape[-2:]) > fft_size:
        raise ConvscopeError(f"filters of {tuple(w.shape[-2:])} do not fit fft_size={fft_size}; raise it")
    power = torch.fft.fft2(w, s=(fft_size, fft_size)).abs().pow(2).sum(1)
    f = torch.fft.fftfreq(fft_size, dtype=torch.float64)
    r = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    low, high = BAND_EDGES
    masks = torch.stack([r < low, (r >= low) & (r < high), r >= high]).to(power)
    return torch.einsum("nyx,byx->nb", power, masks)


def dc_fraction(weight: torch.Tensor) -> torch.Tensor:
    """Share of each filter's energy in its per-channel means (the DC of each colour channel), (C_out,); NaN for
    an all-zero filter. 1 for a constant (flat colour) filter, 0 for a zero-mean (edge, grating) filter."""
    w = weight.detach().to(torch.float64).flatten(2)
    dc = w.mean(2).pow(2).sum(1) * w.shape[2]
    total = w.pow(2).sum((1, 2))
    return torch.where(total > 0, dc / total.clamp_min(1e-300), torch.full_like(total, math.nan))


@dataclass
class FilterStats:
    """The numbers behind paper Fig. 6 (a-c) for one convolution layer (the paper looks at layer 1).

    Per filter (length C_out):
      rms: filter RMS over input channels and taps (:func:`filter_rms`).
      bands: (C_out, 3) fraction of the filter's energy in the low / mid / high radial frequency bands
        (:func:`band_energy`); rows sum to 1; NaN for an all-zero filter.
      dc: fraction of the filter's energy in its per-channel means (:func:`dc_fraction`).
      dead: bool, ``rms < dead_threshold * median(rms)``.
    Summaries:
      dead_fraction: the primary "dead filter" measure (Fig. 6b): share of filters whose RMS is below
        ``dead_threshold`` times the layer's median RMS. With weight decay (convscope's recipe) a filter that no
        gradient reaches decays towards zero and shows flat grey, as the dead filters in the paper's figure do;
        relative to the median, so the measure does not depend on the layer's overall scale.
      inactive_fraction: the data-based alternative, share of filters whose rectified response is never
        positive on the images given (None when no images were given). It also catches a dead ReLU whose
        weights never decayed.
      band_fractions: dict low/mid/high -> mean over filters of the per-filter fractions (each filter counts
        once, so a dominating filter, Fig. 6a, does not set the spectrum; all-zero filters are left out).
        Fig. 6b: AlexNet's layer 1 has little "mid"; Fig. 6c: ZF's covers it.
      smooth_fraction: low + mid, the share of energy below 1/3 cycle/px: how smooth the filters are (the
        paper's layer-1 filters are smooth edges and colour blobs; filters still near a random initialisation
        are white noise, about a third below 1/3 at 7x7).
      dc_mean: mean over filters of ``dc`` (how much of layer 1 is flat colour).
      dominance: ``max(rms) / median(rms)`` (Fig. 6a: about 1 with renormalisation, large without).
    """

    layer: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    rms: torch.Tensor
    bands: torch.Tensor
    dc: torch.Tensor
    dead: torch.Tensor
    dead_threshold: float
    dead_fraction: float
    inactive_fraction: float | None
    band_fractions: dict[str, float]
    dc_mean: float
    dominance: float

    def summary(self) -> dict[str, Any]:
        """The scalar numbers, JSON-ready."""
        return {"layer": self.layer, "kernel": list(self.kernel), "stride": list(self.stride),
                "n_filters": int(self.rms.numel()), "dead_threshold": self.dead_threshold,
                "dead_fraction": self.dead_fraction, "inactive_fraction": self.inactive_fraction,
                **{f"{b}_fraction": v for b, v in self.band_fractions.items()},
                "smooth_fraction": self.band_fractions["low"] + self.band_fractions["mid"],
                "dc_mean": self.dc_mean, "dominance": self.dominance,
                "rms_median": float(self.rms.median()), "rms_max": float(self.rms.max())}


def filter_stats(
    model: nn.Module,
    layer: str | None = "conv1",
    dead_threshold: float = 0.05,
    images: torch.Tensor | None = None,
    fft_size: int = FFT_SIZE,
) -> FilterStats:
    """Measure the filters of ``layer`` (paper Fig. 6 a-c); see :class:`FilterStats` for every definition.

    ``images`` (N, C, H, W) floats, optional, give :attr:`FilterStats.inactive_fraction`: the layer's output
    (for a paper alias, the rectified output) is computed on them in eval mode.
    """
    if not 0 <= dead_threshold < 1:
        raise ConvscopeError(f"dead_threshold is a fraction of the median RMS in [0, 1), got {dead_threshold}")
    conv = conv_module(model, layer)
    weight = conv.weight.detach()
    rms = filter_rms(weight)
    energy = band_energy(weight, fft_size)
    total = energy.sum(1, keepdim=True)
    bands = torch.where(total > 0, energy / total.clamp_min(1e-300), torch.full_like(energy, math.nan))
    dc = dc_fraction(weight)
    median = torch.quantile(rms, 0.5)  # the usual median: the mean of the two middle values for an even count
    dead = rms < dead_threshold * median
    live = ~torch.isnan(bands[:, 0])
    band_means = bands[live].mean(0) if live.any() else torch.full((3,), math.nan, dtype=torch.float64)
    dc_live = ~torch.isnan(dc)
    inactive = None
    if images is not None:
        inactive = _inactive_fraction(model, conv, layer, images)
    return FilterStats(
        layer=layer or "first convolution",
        kernel=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        rms=rms,
        bands=bands,
        dc=dc,
        dead=dead,
        dead_threshold=dead_threshold,
        dead_fraction=float(dead.double().mean()),
        inactive_fraction=inactive,
        band_fractions={b: float(v) for b, v in zip(BANDS, band_means)},
        dc_mean=float(dc[dc_live].mean()) if dc_live.any() else math.nan,
        # A median of 0 means most filters are dead: dominance is then unbounded, reported as inf.
        dominance=float(rms.max() / median) if median > 0 else math.inf,
    )


def _inactive_fraction(model: nn.Module, conv: nn.Conv2d, layer: str | None, images: torch.Tensor) -> float:
    module = conv if _first_conv(model, layer) else site(model, layer)  # an unknown name is an error, as in conv_module
    with torch.no_grad(), eval_mode(model):
        out = run_to(model, module, images)
    if out.dim() != 4:
        raise ConvscopeError(f"layer {layer!r} outputs shape {tuple(out.shape)}, expected (N, C, H, W) maps")
    never = out.detach().transpose(0, 1).flatten(1).amax(1) <= 0
    return float(never.double().mean())


def filter_grid(
    model: nn.Module,
    layer: str | None = "conv1",
    normalize: str = "global",
    zoom: int | None = None,
    nrow: int | None = None,
    pad: int = 2,
) -> np.ndarray:
    """The first-layer filters as one uint8 (H, W, 3) image, as the paper shows them (Fig. 6 a-c).

    Each filter's weights are shown as colours around mid grey: ``pixel = 128 + 127 * w / s`` per input channel
    (R, G, B), rounded and clipped to [1, 255], so zero weight is grey 128 and ``+s`` is 255. The scale ``s``:
    - ``normalize="global"`` (default): the largest ``|w|`` over ALL filters of the layer, so relative magnitudes
      show: a dominating filter (Fig. 6a) is vivid while the others fade to grey, and a dead filter is flat grey.
    - ``normalize="filter"``: each filter's own largest ``|w|``, to read the shape of weak filters.
    Each filter is enlarged ``zoom`` times by pixel replication (default: ``ceil(48 / k)``, about 48 pixels per
    filter, so 7x7 and 11x11 filters show at about the same size), then tiled ``nrow`` per row (default 8 up to
    64 filters, else 16) with ``pad`` white pixels between. One-channel filters are shown grey.
    """
    if normalize not in NORMALIZE:
        raise unknown("normalize option", normalize, NORMALIZE)
    w = conv_module(model, layer).weight.detach().to(torch.float64).cpu()
    if w.shape[1] == 1:
        w = w.expand(-1, 3, -1, -1)
    elif w.shape[1] != 3:
        raise ConvscopeError(f"filters with {w.shape[1]} input channels cannot be shown as colour images; "
                             "filter_grid shows layer 1 (3 or 1 input channels)")
    dims = (1, 2, 3) if normalize == "filter" else (0, 1, 2, 3)
    s = w.abs().amax(dim=dims, keepdim=True)
    scaled = torch.where(s > 0, w / s.clamp_min(1e-300), torch.zeros_like(w))
    pixels = (128 + 127 * scaled).round().clamp(1, 255).to(torch.uint8)
    k = max(w.shape[-2:])
    zoom = zoom or math.ceil(48 / k)
    if zoom < 1:
        raise ConvscopeError(f"zoom must be a positive integer, got {zoom}")
    pixels = pixels.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3).permute(0, 2, 3, 1).numpy()
    nrow = nrow or (8 if len(pixels) <= 64 else 16)
    return make_grid(list(pixels), nrow=nrow, pad=pad, fill=255)


# --------------------------------------------------------------------------------------------------- layer 2


@dataclass
class Aliasing:
    """Stride artifacts in layer-2 projections, paper Fig. 6 (d) vs (e); see :func:`aliasing`.

    fraction: mean over projections of :attr:`per_projection` (the headline number, in [0, 1]).
    per_projection: (P,) fraction of each projection's energy above the cutoff.
    stride: (sy, sx) first-layer stride whose sampling limit sets the cutoff ``1 / (2 s)`` cycles/pixel.
    fraction_at: the same mean fraction at other strides' cutoffs (stride -> fraction), so that two models can
      also be compared at one common cutoff; per_projection_at: its per-projection values (stride -> (P,)).
    channels: the layer-2 maps projected; examples: (9 at most, C, H, W) projections of the strongest
      activations, for the figure.
    """

    layer: str
    stride: tuple[int, int]
    fraction: float
    per_projection: torch.Tensor
    fraction_at: dict[int, float]
    channels: list[int]
    examples: torch.Tensor = field(repr=False)
    per_projection_at: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "stride": list(self.stride), "aliasing": self.fraction,
                "n_projections": int(self.per_projection.numel()), "channels": self.channels,
                **{f"aliasing_s{s}": v for s, v in self.fraction_at.items()}}


def _pair(s: int | Sequence[int]) -> tuple[int, int]:
    pair = (int(s), int(s)) if isinstance(s, int) else tuple(int(v) for v in s)
    if len(pair) != 2 or min(pair) < 1:
        raise ConvscopeError(f"a stride is a positive int or (sy, sx), got {s!r}")
    return pair


def alias_fraction(projections: torch.Tensor, stride: int | Sequence[int], window: str | None = None) -> torch.Tensor:
    """Share of each image's energy above the sampling limit of a stride-``s`` layer, (N,) float64; NaN for
    an image with no energy (a dead projection).

    Each (C, H, W) image has its per-channel mean removed (the DC says nothing about aliasing), is optionally
    multiplied by a 2-D Hann window (``window="hann"``; off by default because a projection is confined to its
    unit's receptive field and zero elsewhere, so its periodic extension has no edge to leak), and its 2-D DFT
    power is summed over channels. The fraction is the power at frequencies STRICTLY above ``1 / (2 sy)`` in
    ``|fy|`` or above ``1 / (2 sx)`` in ``|fx|`` (cycles/pixel), over the total: what a grid sampled every ``s``
    pixels cannot represent. A +1/-1 checkerboard gives 1 for any stride >= 2; a smooth blob gives about 0.
    """
    sy, sx = _pair(stride)
    x = projections.detach().to(torch.float64)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ConvscopeError(f"projections must be (N, C, H, W), got shape {tuple(projections.shape)}")
    x = x - x.mean((2, 3), keepdim=True)
    h, w = x.shape[-2:]
    if window == "hann":
        x = x * (torch.hann_window(h, periodic=False, dtype=x.dtype)[:, None]
                 * torch.hann_window(w, periodic=False, dtype=x.dtype)[None, :])
    elif window is not None:
        raise unknown("window", window, ("hann", None))
    power = torch.fft.fft2(x).abs().pow(2).sum(1)
    fy, fx = torch.fft.fftfreq(h, dtype=x.dtype).abs(), torch.fft.fftfreq(w, dtype=x.dtype).abs()
    above = (fy[:, None] > 1 / (2 * sy)) | (fx[None, :] > 1 / (2 * sx))
    total = power.sum((1, 2))
    high = (power * above).sum((1, 2))
    return torch.where(total > 0, high / total.clamp_min(1e-300), torch.full_like(total, math.nan))


def first_conv_stride(model: nn.Module) -> tuple[int, int]:
    """The stride (sy, sx) of the model's first convolution (the paper's layer-1 stride: 2 ZF, 4 AlexNet)."""
    return tuple(conv_module(model, None).stride)


def aliasing(
    model: nn.Module,
    images: torch.Tensor,
    layer: str = "conv2",
    first_stride: int | Sequence[int] | None = None,
    n_units: int = 16,
    rule: str = "deconvnet",
    window: str | None = None,
    strides: Sequence[int] = (2, 4),
    nonlinearities: str = "error",
) -> Aliasing:
    """How much of the layer-2 projections lies above the first layer's sampling limit: paper Fig. 6 (d, e).

    Procedure: the ``n_units`` maps of ``layer`` with the largest activation anywhere in ``images`` are chosen
    (maps never positive are skipped); for each chosen map and each image where it is active, its strongest
    activation is projected to pixels with ``Projector(model, rule)`` (section 2.1, seeded with its value).
    The result is the mean over these projections of :func:`alias_fraction` at the stride ``first_stride``
    (default: the stride of the model's first convolution), i.e. the share of energy strictly above
    ``1 / (2 s)`` cycles/pixel in either axis. :attr:`Aliasing.fraction_at` repeats it at the cutoffs of
    ``strides`` so that models can also be compared at one common cutoff.

    What it measures, honestly: a projection through a stride-``s`` layer 1 is a sum of layer-1 filters placed on
    an ``s``-pixel grid. Unless the filters suppress them, that grid's spectral copies lie above ``1 / (2 s)``:
    the checkerboard-like artifacts of Fig. 6(d). But energy there also comes from genuine fine detail in the
    filters (sharp edges), so the number is an upper bound on stride artifacts, and it is only comparable between
    models at the same cutoff (``fraction_at``) or read as "share beyond what this stride can sample".

    Cost: one forward and backward pass over the images per chosen map (``n_units`` x N projections); 16 images
    are plenty for a stable mean.
    """
    if rule not in RULES:
        raise unknown("rule", rule, RULES)
    if n_units < 1:
        raise ConvscopeError(f"n_units must be at least 1, got {n_units}")
    stride = _pair(first_stride) if first_stride is not None else first_conv_stride(model)
    with torch.no_grad(), eval_mode(model):
        act = run_to(model, site(model, layer), images).detach()
    if act.dim() != 4:
        raise ConvscopeError(f"layer {layer!r} outputs shape {tuple(act.shape)}, expected (N, C, H, W) maps")
    peak = act.flatten(2).amax(2)  # (N, C): each map's strongest activation per image
    best = peak.amax(0)
    order = torch.argsort(best, descending=True, stable=True)
    channels = [int(c) for c in order[: min(n_units, len(order))] if best[c] > 0]
    if not channels:
        raise ConvscopeError(f"no map of layer {layer!r} is active on these images: nothing to project")
    projector = Projector(model, rule, nonlinearities)
    projections, strengths = [], []
    for c in channels:
        active = torch.nonzero(peak[:, c] > 0).flatten()
        projections.append(projector.project(images[active], layer, channel=c))
        strengths.append(peak[active, c])
    projections_t, strengths_t = torch.cat(projections), torch.cat(strengths)
    per = alias_fraction(projections_t, stride, window)
    ok = ~torch.isnan(per)
    if not ok.any():
        raise ConvscopeError(f"every projection of layer {layer!r} is zero: nothing to measure")
    at = {int(s): alias_fraction(projections_t[ok], s, window) for s in strides}
    top = torch.argsort(strengths_t, descending=True, stable=True)[:9]
    return Aliasing(layer=layer, stride=stride, fraction=float(per[ok].mean()), per_projection=per[ok],
                    fraction_at={s: float(v.mean()) for s, v in at.items()}, channels=channels,
                    examples=projections_t[top].float(), per_projection_at=at)


# --------------------------------------------------------------------------------------------------- together


@dataclass
class Diagnosis:
    """Paper Fig. 6 for one model: layer-1 :class:`FilterStats`, its filter grid, layer-2 :class:`Aliasing`."""

    stats: FilterStats
    aliasing: Aliasing
    grid: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, Any]:
        a = self.aliasing.summary()
        return {**self.stats.summary(), "aliasing": a["aliasing"], "aliasing_stride": a["stride"],
                "aliasing_layer": a["layer"], "n_projections": a["n_projections"],
                **{k: v for k, v in a.items() if k.startswith("aliasing_s")}}


def diagnose(model: nn.Module, images: torch.Tensor, layer1: str | None = "conv1", layer2: str = "conv2",
             n_units: int = 16, dead_threshold: float = 0.05, rule: str = "deconvnet",
             normalize: str = "global", nonlinearities: str = "error") -> Diagnosis:
    """Everything Fig. 6 shows about one model, on ``images`` (N, C, H, W floats in the model's input range)."""
    return Diagnosis(
        stats=filter_stats(model, layer1, dead_threshold=dead_threshold, images=images),
        aliasing=aliasing(model, images, layer2, n_units=n_units, rule=rule, nonlinearities=nonlinearities),
        grid=filter_grid(model, layer1, normalize=normalize),
    )


def compare(models: Mapping[str, nn.Module], images: torch.Tensor, **options) -> dict[str, Diagnosis]:
    """:func:`diagnose` each model on the same images, e.g. ``{"AlexNet": alex, "ZF": zf, "ZF no renorm": zf0}``
    for paper Fig. 6 (a-e). ``options`` go to :func:`diagnose`."""
    return {name: diagnose(model, images, **options) for name, model in models.items()}


_BARS = (("dead", "dead_fraction"), ("low", "low_fraction"), ("mid", "mid_fraction"),
         ("high", "high_fraction"), ("alias s=2", "aliasing_s2"), ("alias s=4", "aliasing_s4"),
         ("alias own s", "aliasing"))


def crop_examples(examples: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """Cut one square window out of each projection, centred on its support (the pixels above 1 % of its largest
    magnitude) and as large as the largest support plus ``margin``, so that layer-2 projections show as the paper
    shows them (Fig. 6 d, e): the unit's receptive field, not the whole mostly grey image."""
    x = examples.detach()
    n, _, h, w = x.shape
    mag = x.abs().amax(1)
    boxes = []
    for m in mag:
        ys, xs = torch.nonzero(m > 0.01 * m.max(), as_tuple=True) if m.max() > 0 else (None, None)
        boxes.append((0, h - 1, 0, w - 1) if ys is None else (int(ys.min()), int(ys.max()), int(xs.min()),
                                                              int(xs.max())))
    side = min(h, w, max(max(b[1] - b[0], b[3] - b[2]) + 1 for b in boxes) + 2 * margin)
    crops = []
    for img, (y0, y1, x0, x1) in zip(x, boxes):
        top = min(max((y0 + y1 + 1) // 2 - side // 2, 0), h - side)
        left = min(max((x0 + x1 + 1) // 2 - side // 2, 0), w - side)
        crops.append(img[:, top : top + side, left : left + side])
    return torch.stack(crops) if n else x


def filters_figure(diagnoses: Mapping[str, Diagnosis],
                   title: str = "Fig. 6: architecture diagnosis of layers 1 and 2", note: str | None = None):
    """A matplotlib Figure (Agg) of paper Fig. 6: per model (a column), the layer-1 filters scaled together, so
    that a dominating filter (6a) and dead ones (6b) show, above the projections of the 9 strongest layer-2
    activations cropped to their support (6d, 6e); below, a bar chart of the fractions and a table of all the
    numbers."""
    from matplotlib.figure import Figure

    if not diagnoses:
        raise ConvscopeError("filters_figure needs at least one diagnosis")
    names = list(diagnoses)
    n = len(names)
    fig = Figure(figsize=(max(4.0 * n, 9.0), 11.5))
    gs = fig.add_gridspec(4, n, height_ratios=[2.3, 3.0, 2.6, 0.9], hspace=0.32, wspace=0.08)
    for i, name in enumerate(names):
        d = diagnoses[name]
        s, a = d.stats, d.aliasing
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(d.grid, interpolation="nearest")
        ax.set_title(f"{name}\nlayer 1: {s.kernel[0]}x{s.kernel[1]} stride {s.stride[0]}\n"
                     f"dominance {s.dominance:.2f}  dead {s.dead_fraction:.0%}\n"
                     f"mid {s.band_fractions['mid']:.2f}  below 1/3: {s.summary()['smooth_fraction']:.2f}",
                     fontsize=9)
        ax.axis("off")
        ax = fig.add_subplot(gs[1, i])
        ax.imshow(make_grid(list(to_image(crop_examples(a.examples))), nrow=3, pad=1), interpolation="nearest")
        ax.set_title(f"{a.layer}: 9 strongest projections\nenergy above 1/(2*{a.stride[0]}) px^-1: "
                     f"{a.fraction:.2f}", fontsize=9)
        ax.axis("off")

    rows = [diagnoses[k].summary() for k in names]
    ax = fig.add_subplot(gs[2, :])
    width = 0.8 / n
    xs = np.arange(len(_BARS))
    for i, (name, row) in enumerate(zip(names, rows)):
        values = [row.get(key, math.nan) for _, key in _BARS]
        bars = ax.bar(xs + (i - (n - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(xs, [label for label, _ in _BARS])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction")
    ax.set_title("layer 1: dead filters and filter energy by radial frequency (low < 1/6 <= mid < 1/3 <= high); "
                 "layer 2: projection energy above 1/(2s)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")

    ax = fig.add_subplot(gs[3, :])
    ax.axis("off")
    cols = ["dead", "inactive", "low", "mid", "high", "below 1/3", "DC", "dominance", "alias own", "alias s=2",
            "alias s=4"]
    keys = ["dead_fraction", "inactive_fraction", "low_fraction", "mid_fraction", "high_fraction", "smooth_fraction",
            "dc_mean", "dominance", "aliasing", "aliasing_s2", "aliasing_s4"]

    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"

    table = ax.table(cellText=[[fmt(r.get(k)) for k in keys] for r in rows], rowLabels=names, colLabels=cols,
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(cols))))
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=12, y=0.995)
    return fig


def _json_safe(v):
    # Strict JSON has no NaN or Infinity (an all-zero layer's dominance, a band of no filter): write null.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def save_diagnosis(out_dir: str | Path, diagnoses: Mapping[str, Diagnosis], fig=None, name: str = "fig6"
                   ) -> list[Path]:
    """Write Fig. 6 into ``out_dir``: ``<name>.png`` (``fig`` or a fresh :func:`filters_figure`), ``<name>.json``
    (the numbers of every model) and ``conv1_<i>.png`` (each model's filter grid, in the order given)."""
    out = Path(out_dir)
    numbers = {label: {k: _json_safe(v) for k, v in d.summary().items()} for label, d in diagnoses.items()}
    written = [artifacts.write_json(out / f"{name}.json", numbers)]
    for i, d in enumerate(diagnoses.values()):
        written.append(artifacts.save_image(out / f"conv1_{i}.png", d.grid))
    written.append(artifacts.save_figure(out / f"{name}.png", fig if fig is not None else filters_figure(diagnoses)))
    return written


# ------------------------------------------------------------------------------------------------- a run


@dataclass
class FiltersResult:
    """Fig. 6 over a run: the :class:`Diagnosis` of the run's model and of the runs set beside it, by label, and
    per label what its weights are (``recipes``: model, renorm, epoch; empty for an attached run), so that the
    findings compare like with like."""

    diagnoses: dict[str, Diagnosis]
    note: str | None = None
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _layer2(run) -> str:
    """The layer whose projections show layer 1's aliasing: conv2, or the model's second stage."""
    if "conv2" in run.paper_names:
        return "conv2"
    maps = run.map_layers()
    return maps[1] if len(maps) > 1 else maps[0]


def _same_data(run: Run, other: Run) -> bool:
    """Whether two trained runs saw the same data set and classes."""
    a, b = run.config, other.config
    return a is not None and b is not None and (a.data, a.data_root, a.classes) == (b.data, b.data_root, b.classes)


def compute(run: Run, others: tuple[str, ...] = (), n_images: int = 16) -> FiltersResult:
    """Fig. 6: layer-1 filter grids and the numbers behind the paper's words (dead filters, frequency bands,
    dominance, layer-2 aliasing) for this run and the runs set beside it: ``others`` (run directories) and the
    demo's ``compare/`` runs on the same data. A compared run of fewer epochs is matched by this run's checkpoint
    at that epoch, so the comparison is like for like."""
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ConvscopeError(f"n_images must be a positive whole number, got {n_images!r}")
    runs = [open_run(p) for p in others]
    # The demo's compare/ runs that differ from this one in architecture or recipe only: its runs on other data
    # (Table 1's parts, the transfer's six classes) would not compare like for like.
    runs += [other for other in map(open_run, run.layout.compared_runs()) if _same_data(run, other)]
    images = run.split(run.default_split("val"))
    images = images.batch(torch.arange(min(n_images, len(images))))[0]
    models = {run.name: (run.model, run)}
    recipes = {run.name: _recipe(run)}
    for other in runs:
        epochs = other.config.epochs if other.config is not None else None
        if run.config is not None and epochs is not None and epochs < run.config.epochs and epochs in run.checkpoints:
            models[f"{run.name} (epoch {epochs})"] = (run.model_at(run.checkpoints[epochs]), run)
            recipes[f"{run.name} (epoch {epochs})"] = _recipe(run, epochs)
        label = other.name if other.name not in models else f"{other.name} ({other.path.name})"
        models[label] = (other.model, other)
        recipes[label] = _recipe(other)
    diagnoses = {label: diagnose(model, images, layer1="conv1" if "conv1" in paper_names(model)
                                 else None, layer2=_layer2(owner), nonlinearities=owner.nonlinearities)
                 for label, (model, owner) in models.items()}
    return FiltersResult(diagnoses, gradient_note("deconvnet", run.nonlinearities), recipes)


def _recipe(run: Run, epoch: int | None = None) -> dict[str, Any]:
    cfg = run.config
    return {} if cfg is None else {"model": cfg.model, "renorm": bool(cfg.renorm), "epoch": epoch or cfg.epochs}


def _dominance(rms: np.ndarray) -> float:
    return float(rms.max() / np.median(rms))  # as FilterStats.dominance: np.median is torch.quantile's 0.5


def findings(result: FiltersResult) -> list[Finding]:
    """Paper Fig. 6 (section 4.1), for the runs set beside this one (the demo's ``compare/``), each against the
    run of the first layer it is compared with at the same epoch: (b, c) the smaller-stride layer 1 (ZF's 7x7 s2)
    keeps more mid-frequency energy than the larger (AlexNet's 11x11 s4), over filters; (d, e) the larger stride's
    layer-2 projections alias more, over projections, above the smaller stride's sampling limit in both; (a)
    without renormalisation a few layer-1 filters dominate: max/median filter RMS, the filters resampled."""
    d, rec = result.diagnoses, result.recipes
    epoch, stride = (lambda lab: rec.get(lab, {}).get("epoch")), (lambda lab: tuple(d[lab].stats.stride))
    renormed = [lab for lab in d if rec.get(lab, {}).get("renorm") is not False]
    small = min((stride(lab) for lab in renormed), default=None)
    alex = next((lab for lab in renormed if stride(lab) > small), None)
    zf = next((lab for lab in renormed if alex and stride(lab) == small and epoch(lab) == epoch(alex)), None)
    out = []
    if zf and alex:
        z, a = d[zf].stats, d[alex].stats
        name = f"{z.kernel[0]}x{z.kernel[1]} stride {z.stride[0]}", f"{a.kernel[0]}x{a.kernel[1]} stride {a.stride[0]}"
        mid = [s.bands[:, 1][~torch.isnan(s.bands[:, 1])] for s in (z, a)]  # an all-zero filter has no spectrum
        out.append(finding("fig6.mid_frequency", f"A smaller first layer ({name[0]}) keeps more mid-frequency "
                           f"energy than AlexNet's ({name[1]})", "Zeiler & Fergus 2014, Fig. 6b-c", "fig6",
                           difference_contrast(*mid, unit="filters"),
                           f"layer-1 filters' mean share of energy in 1/6-1/3 cycle/px, {zf} minus {alex}",
                           "qualitative (Fig. 6b-c)", f"mid {z.band_fractions['mid']:.2f} ({zf}) vs "
                           f"{a.band_fractions['mid']:.2f} ({alex})"))
        # At one cutoff for both, the smaller stride's sampling limit: above it neither grid can sample. At each
        # model's own limit the larger stride's lower cutoff alone makes it "alias more", random weights included.
        za, aa, cut = d[zf].aliasing, d[alex].aliasing, z.stride[0]
        if cut in za.per_projection_at and cut in aa.per_projection_at:
            out.append(finding("fig6.layer2_aliasing", f"A stride-{a.stride[0]} layer 1 makes layer 2 alias more "
                               f"than stride {z.stride[0]}", "Zeiler & Fergus 2014, Fig. 6d-e", "fig6",
                               difference_contrast(aa.per_projection_at[cut], za.per_projection_at[cut],
                                                   unit="projections"),
                               f"{aa.layer} projections' mean energy share above 1/{2 * cut} cycle/px, {alex} minus "
                               f"{zf}", "qualitative (Fig. 6d-e)",
                               f"above 1/{2 * cut}: {aa.fraction_at[cut]:.2f} ({alex}) vs {za.fraction_at[cut]:.2f} "
                               f"({zf}); above each one's own limit {aa.fraction:.2f} vs {za.fraction:.2f}"))
    raw = next((lab for lab in d if rec.get(lab, {}).get("renorm") is False), None)
    twin = next((lab for lab in renormed if raw and stride(lab) == stride(raw) and epoch(lab) == epoch(raw)
                 and d[lab].stats.kernel == d[raw].stats.kernel), None)
    if raw and twin and math.isfinite(d[raw].stats.dominance) and math.isfinite(d[twin].stats.dominance):
        out.append(finding("fig6.renorm_dominance", "Without filter renormalisation a few layer-1 filters dominate",
                           "Zeiler & Fergus 2014, Fig. 6a", "fig6",
                           bootstrap_contrast([d[raw].stats.rms, d[twin].stats.rms],
                                              lambda x, y: _dominance(x) - _dominance(y), unit="filters"),
                           f"layer-1 max/median filter RMS, {raw} minus {twin}", "qualitative (Fig. 6a)",
                           f"dominance {d[raw].stats.dominance:.2f} without vs {d[twin].stats.dominance:.2f} with"))
    return out


def write_filters(result: FiltersResult, layout: Layout, name: str = "fig6") -> list[Path]:
    """Fig. 6 into the run's figures: ``<name>.png``, ``<name>.json`` and each model's filter grid."""
    figure = filters_figure(result.diagnoses, note=result.note)
    return save_diagnosis(layout.figures, result.diagnoses, figure, name=name)


register(Analysis(
    "filters", "fig6", "Fig. 6", "Architecture diagnosis of layers 1 and 2",
    "Layer-1 filters with and without filter renormalisation, and with a large (11x11, stride 4) vs the "
    "paper's smaller (7x7, stride 2) first layer.",
    files=figure_files("fig6"), compute=compute, projects=True, findings=findings,
    write=write_filters,
    help={"others": "Another run to set beside this one (repeatable); the demo's RUN/compare/ runs come "
                    "by default.",
          "n_images": "Images for the layer-2 projections."},
    flags={"others": "--compare"}))


__all__ = [
    "BANDS", "BAND_EDGES", "Aliasing", "Diagnosis", "FilterStats", "alias_fraction", "aliasing", "band_energy",
    "compare", "conv_module", "crop_examples", "dc_fraction", "diagnose", "filters_figure", "filter_grid", "filter_rms",
    "filter_stats", "first_conv_stride", "save_diagnosis", "write_filters",
]
