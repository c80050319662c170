"""filters: paper Fig. 6 numbers on hand-made filters and projections whose answers are known exactly."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from convscope import create_model
from convscope.errors import ConvscopeError
from convscope.filters import (
    alias_fraction,
    aliasing,
    band_energy,
    compare,
    crop_examples,
    dc_fraction,
    filter_grid,
    filter_stats,
    filters_figure,
    save_diagnosis,
)


def _conv1_model(weight: torch.Tensor, stride: int = 1) -> nn.Module:
    """A one-layer net whose conv1 holds ``weight`` exactly."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[-2:]), stride=stride, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return nn.Sequential(OrderedDict(conv1=conv, relu1=nn.ReLU()))


def _fractions(weight: torch.Tensor, fft_size: int = 48) -> torch.Tensor:
    e = band_energy(weight, fft_size)
    return e / e.sum(1, keepdim=True)


def _lattice_fraction(n: int, lo: float, hi: float) -> float:
    """Share of the n x n DFT bins with lo <= radial frequency < hi: a flat spectrum's band fraction."""
    f = [k / n if k < n / 2 else (k - n) / n for k in range(n)]
    inside = sum(1 for a in f for b in f if lo <= math.hypot(a, b) < hi)
    return inside / n**2


# ------------------------------------------------------------------------------------------ frequency bands


def test_grating_on_its_own_dft_bin_falls_in_one_band_exactly():
    n = 48
    y, x = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    checker = ((-1.0) ** (x + y)).expand(3, n, n)  # all energy at (0.5, 0.5), r = 0.707: "high"
    slow = torch.cos(2 * math.pi * x / 8).expand(3, n, n)  # 6 whole periods: f = 1/8 < 1/6: "low"
    mid = torch.cos(2 * math.pi * x / 4).expand(3, n, n)  # f = 1/4, in [1/6, 1/3): "mid"
    fr = _fractions(torch.stack([checker, slow, mid]).double())
    expected = torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float64)  # columns: low, mid, high
    assert torch.allclose(fr, expected, atol=1e-12)


def test_parseval_and_small_filters_on_the_common_grid():
    w = torch.randn(4, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    e = band_energy(w)
    assert torch.allclose(e.sum(1), 48**2 * w.double().pow(2).sum((1, 2, 3)), rtol=1e-10)
    # A 7x7 checkerboard is a box modulated to (0.5, 0.5): its main lobe (half-width 1/7 per axis) lies at
    # r > 0.5, far above 1/3; only the box's faint sidelobes reach lower bands.
    y, x = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    checker = ((-1.0) ** (x + y)).expand(1, 3, 7, 7)
    assert _fractions(checker)[0, 2] > 0.95
    # A 7x7 slow cosine (period 10 px): its lobe f = 0.1 +- 1/7 is mostly low, but a 7-tap window leaks.
    slow = torch.cos(2 * math.pi * x / 10).expand(1, 3, 7, 7)
    assert _fractions(slow)[0].tolist() == pytest.approx([0.738, 0.198, 0.064], abs=1e-3)


def test_band_energy_matches_a_direct_dtft_sum():
    w = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3)).double()
    n = 12
    f = np.fft.fftfreq(n)
    taps = np.arange(5)
    basis = np.exp(-2j * np.pi * np.outer(f, taps))  # (freq, tap)
    spectrum = np.einsum("uy,vx,ocyx->ocuv", basis, basis, w.numpy())  # the DTFT at the DFT grid frequencies
    power = (np.abs(spectrum) ** 2).sum(1)
    r = np.hypot(f[:, None], f[None, :])
    bands = [r < 1 / 6, (r >= 1 / 6) & (r < 1 / 3), r >= 1 / 3]
    expected = np.stack([(power * m).sum((1, 2)) for m in bands], 1)
    assert np.allclose(band_energy(w, fft_size=n).numpy(), expected, rtol=1e-10)


def test_delta_filter_has_a_flat_spectrum_and_constant_filter_is_all_dc():
    delta = torch.zeros(1, 3, 7, 7)
    delta[0, :, 3, 3] = 1.0
    expected = [_lattice_fraction(48, 0, 1 / 6), _lattice_fraction(48, 1 / 6, 1 / 3),
                _lattice_fraction(48, 1 / 3, 1.0)]
    assert torch.allclose(_fractions(delta)[0], torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert expected[0] == pytest.approx(193 / 2304)  # lattice points with i^2 + j^2 < 8^2

    const = torch.ones(2, 3, 7, 7)
    const[1] = torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1)  # a colour-opponent blob: still all DC
    edge = torch.zeros(1, 3, 7, 7)
    edge[..., :3], edge[..., 4:] = 1.0, -1.0
    assert dc_fraction(torch.cat([const, edge])).tolist() == pytest.approx([1.0, 1.0, 0.0])
    # A 7-tap box's main lobe is |f| < 1/7 per axis, under the low edge 1/6: most of its energy is "low"; the
    # rest is the box's sidelobes, the true response of a filter that stops at its 7x7 edge.
    assert _fractions(const)[0].tolist() == pytest.approx([0.8279, 0.1069, 0.0652], abs=1e-4)


# ------------------------------------------------------------------------------------------ dead, dominance


def test_dead_fraction_and_dominance_hand_computed():
    w = torch.ones(5, 3, 2, 2)
    w[0] = 0.0  # dead
    w[4] = 10.0  # dominates: RMS 10 vs median 1
    w[2] = -1.0  # RMS does not care about sign
    model = _conv1_model(w)
    s = filter_stats(model, "conv1", dead_threshold=0.05)
    assert s.rms.tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0, 10.0])
    assert s.dead.tolist() == [True, False, False, False, False]
    assert s.dead_fraction == pytest.approx(1 / 5)
    assert s.dominance == pytest.approx(10.0)
    assert s.inactive_fraction is None
    # Constant filters: all DC; the all-zero filter has no spectrum and is left out of the means.
    assert math.isnan(s.dc[0]) and s.dc_mean == pytest.approx(1.0)
    assert torch.isnan(s.bands[0]).all()
    assert sum(s.band_fractions.values()) == pytest.approx(1.0)
    assert s.band_fractions["low"] == pytest.approx(float(s.bands[1, 0]))


def test_dead_threshold_is_relative_to_the_median():
    w = torch.ones(5, 3, 1, 1)
    w[0], w[1] = 0.04, 0.06  # 4 % and 6 % of the median RMS 1
    s = filter_stats(_conv1_model(w), "conv1", dead_threshold=0.05)
    assert s.dead.tolist() == [True, False, False, False, False]
    assert filter_stats(_conv1_model(w * 1000), "conv1").dead_fraction == pytest.approx(0.2)  # scale-free
    # An even count: RMS 0.02, 0.03, 1, 1; the median is the mean of the two middle values, (0.03 + 1) / 2 =
    # 0.515, and 5 % of it is 0.02575: 0.02 is dead, 0.03 is not.
    s4 = filter_stats(_conv1_model(torch.cat([w[:2] * 0.5, w[2:4]])), "conv1")
    assert s4.dominance == pytest.approx(1.0 / 0.515) and s4.dead.tolist() == [True, False, False, False]


def test_inactive_fraction_counts_maps_never_positive():
    w = torch.zeros(4, 3, 1, 1)
    w[0], w[1], w[2] = 1.0, -1.0, 0.5  # on positive images: map 1 is negative, map 3 zero -> never positive
    s = filter_stats(_conv1_model(w), "conv1", images=torch.rand(2, 3, 5, 5) + 0.1)
    assert s.inactive_fraction == pytest.approx(0.5)


def test_paper_alias_resolves_to_the_convolution_before_the_relu():
    model = create_model("alexnet_small", num_classes=3)
    s = filter_stats(model, "conv1")
    assert s.kernel == (11, 11) and s.stride == (4, 4) and s.rms.numel() == 32
    assert torch.allclose(s.rms, model.features.conv1.weight.double().flatten(1).pow(2).mean(1).sqrt())


# ------------------------------------------------------------------------------------------ filter grid


def test_filter_grid_pixels_global_and_per_filter():
    w = torch.zeros(2, 3, 2, 2)
    w[0, 0, 0, 0] = 2.0  # the largest |w|: 255 in the red channel
    w[0, 1, 0, 1] = -2.0  # -> 1
    w[0, 2, 1, 0] = 1.0  # -> 128 + 63.5 = 191.5 -> 192 (rounded half to even)
    w[1, 0, 0, 0] = 0.5  # filter 1 is weak: 160 globally (128 + 31.75), 255 on its own scale
    model = _conv1_model(w)
    g = filter_grid(model, zoom=3, nrow=2, pad=1)
    assert g.shape == (1 + 6 + 1, 1 + 2 * (6 + 1), 3) and g.dtype == np.uint8
    f0, f1 = g[1:7, 1:7], g[1:7, 8:14]
    assert (f0[0:3, 0:3, 0] == 255).all() and (f0[0:3, 0:3, 1:] == 128).all()  # one weight -> a 3x3 block
    assert (f0[0:3, 3:6, 1] == 1).all() and (f0[3:6, 0:3, 2] == 192).all()
    assert (f0[3:6, 3:6] == 128).all()  # zero weight is mid grey
    assert (f1[0:3, 0:3, 0] == 160).all() and (f1[0:3, 0:3, 1:] == 128).all() and (f1[3:] == 128).all()
    assert (g[0] == 255).all() and (g[:, 7] == 255).all()  # white padding
    g1 = filter_grid(model, normalize="filter", zoom=1, nrow=2, pad=0)
    assert g1[0, 2].tolist() == [255, 128, 128] and g1[0, 1].tolist() == [128, 1, 128]


def test_filter_grid_default_zoom_makes_7_and_11_pixel_filters_comparable():
    zf = filter_grid(create_model("zfnet_small", num_classes=3))
    alex = filter_grid(create_model("alexnet_small", num_classes=3))
    # 32 filters, 8 per row, 4 rows: 7 * 7 = 49 px and 11 * 5 = 55 px per filter, 2 px padding.
    assert zf.shape == (2 + 4 * 51, 2 + 8 * 51, 3) and alex.shape == (2 + 4 * 57, 2 + 8 * 57, 3)
    with pytest.raises(ConvscopeError, match="input channels"):
        filter_grid(create_model("zfnet_small", num_classes=3), "conv2")


# ------------------------------------------------------------------------------------------ aliasing


def test_alias_fraction_checkerboard_vs_blob():
    n = 32
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64),
                          indexing="ij")
    checker = ((-1.0) ** (x + y)).expand(3, n, n)
    blob = torch.exp(-((x - 15.5) ** 2 + (y - 15.5) ** 2) / (2 * 3.0**2)).expand(3, n, n)
    fr = alias_fraction(torch.stack([checker, blob, torch.zeros(3, n, n)]), stride=2)
    assert fr[0] == pytest.approx(1.0, abs=1e-12)
    # A Gaussian of sigma 3 px has power exp(-(2 pi sigma f)^2): at f = 1/4 that is e^-22, nothing.
    assert fr[1] < 1e-6
    assert math.isnan(fr[2])
    assert alias_fraction(checker, stride=4, window="hann")[0] == pytest.approx(1.0, abs=1e-12)


def test_alias_fraction_of_a_point_is_the_share_of_bins_above_the_cutoff():
    img = torch.zeros(1, 1, 16, 16)
    img[0, 0, 5, 9] = 1.0
    # A point has a flat spectrum; removing the mean empties only DC. Of 16 frequencies k/16 (k = -8..7),
    # 9 have |k| <= 4 (|f| <= 1/4): 81 of 256 bins are below in both axes, DC among them.
    assert float(alias_fraction(img, 2)) == pytest.approx(175 / 255)
    assert float(alias_fraction(img, 1)) == 0.0  # nothing lies strictly above 1/2
    assert float(alias_fraction(img, (1, 2))) == pytest.approx((256 - 16 * 9) / 255)  # x axis only: 7 * 16 bins


def _box_net() -> nn.Module:
    """conv1: 2x2 box, stride 2; conv2: 1x1 identity. A conv2 unit projects to one 2x2 box of pixels."""
    conv1 = nn.Conv2d(3, 1, 2, stride=2, bias=False)
    conv2 = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv1.weight.fill_(1.0)
        conv2.weight.fill_(1.0)
    return nn.Sequential(OrderedDict(conv1=conv1, relu1=nn.ReLU(), conv2=conv2, relu2=nn.ReLU()))


def test_aliasing_on_a_model_with_a_predictable_projection():
    model = _box_net()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    a = aliasing(model, images, layer="relu2", n_units=4)
    assert a.stride == (2, 2) and a.channels == [0] and a.per_projection.numel() == 3
    # One 2x2 box per projection, seeded with the unit's value. Per axis |2 cos(pi f)|^2 = 2 + 2 cos(2 pi f)
    # sums to 32 over the 16 frequencies and to 2 (9 + 1 + 2 (cos pi/8 + cos pi/4 + cos 3pi/8)) over |k| <= 4.
    # Removing the mean empties DC, whose power is 4^2 = 16.
    below_1d = 2 * (10 + 2 * (math.cos(math.pi / 8) + math.cos(math.pi / 4) + math.cos(3 * math.pi / 8)))
    expected = (32**2 - below_1d**2) / (32**2 - 16)
    assert expected == pytest.approx(0.23505, abs=1e-5)
    assert torch.allclose(a.per_projection, torch.full((3,), expected, dtype=torch.float64), atol=1e-9)
    assert a.fraction == pytest.approx(expected)
    assert a.fraction_at[4] > a.fraction  # a lower cutoff counts more of the box's spectrum
    # The strongest projection is the 2x2 box under the strongest conv2 unit, in every colour channel.
    ex = a.examples[0]
    assert (ex > 0).sum() == 3 * 4 and torch.allclose(ex[0], ex[2])


def test_aliasing_explicit_stride_and_bad_input():
    model = _box_net()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert aliasing(model, images, "relu2", first_stride=1).fraction == 0.0
    with pytest.raises(ConvscopeError, match="no map"):
        aliasing(model, -torch.rand(2, 3, 16, 16), "relu2")
    with pytest.raises(ConvscopeError, match="rule"):
        aliasing(model, images, "relu2", rule="lrp")


def test_crop_examples_cuts_a_common_square_around_each_support():
    x = torch.zeros(2, 3, 10, 10)
    x[0, :, 6:8, 6:8] = 1.0  # support 2x2 at rows/cols 6-7
    x[1, 1, 0:3, 1] = -1.0  # support 3x1 at rows 0-2, col 1
    x[1, 0, 9, 9] = 0.005  # under 1 % of the peak: not support
    c = crop_examples(x, margin=1)
    assert c.shape == (2, 3, 5, 5)  # largest support side 3, plus 1 on each side
    # Image 0: centre (7, 7), window 5 from 7 - 2 = 5; image 1: centre (1, 1), clamped to the top-left corner.
    assert torch.equal(c[0], x[0, :, 5:10, 5:10]) and torch.equal(c[1], x[1, :, 0:5, 0:5])


# ------------------------------------------------------------------------------------------ compare, figure


def test_compare_figure_and_save(tmp_path):
    torch.manual_seed(0)
    models = {"zf": create_model("zfnet_small", num_classes=3), "alex": create_model("alexnet_small", num_classes=3)}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = compare(models, images, n_units=2)
    assert list(out) == ["zf", "alex"]
    assert out["zf"].stats.stride == (2, 2) and out["alex"].aliasing.stride == (4, 4)
    for d in out.values():
        row = d.summary()
        assert 0.0 <= row["aliasing"] <= 1.0 and row["n_filters"] == 32
        assert sum(row[f"{b}_fraction"] for b in ("low", "mid", "high")) == pytest.approx(1.0)
        # Fresh He-initialised filters are white noise: band fractions follow the bands' areas on the DFT grid.
        assert row["high_fraction"] == pytest.approx(_lattice_fraction(48, 1 / 3, 1.0), abs=0.08)
    fig = filters_figure(out)
    assert len(fig.axes) == 2 * 2 + 2
    paths = save_diagnosis(tmp_path, out, fig)
    assert sorted(p.name for p in paths) == ["conv1_0.png", "conv1_1.png", "fig6.json", "fig6.png"]
    from PIL import Image

    assert (np.asarray(Image.open(tmp_path / "conv1_1.png")) == out["alex"].grid).all()
    assert (tmp_path / "fig6.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "fig6.json").read_text())
    assert saved["alex"]["kernel"] == [11, 11] and saved["zf"]["dominance"] == pytest.approx(out["zf"].stats.dominance)
