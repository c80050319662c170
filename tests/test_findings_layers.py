"""Findings of Fig. 2 (class-specific upper-layer units), Fig. 6 (architecture diagnosis) and Table 3 (ablation),
on results built by hand: the contrast and its interval computed here from the definitions, and the verdict
flipping when the result's numbers are changed (reversed when the effect is turned round, not shown when it is
noise)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from convscope import ablation, filters, units
from convscope.ablation import AblationResult, AblationRow
from convscope.data import ImageSet
from convscope.filters import Aliasing, Diagnosis, FiltersResult, FilterStats
from convscope.findings import HOLDS, NOT_SHOWN, REVERSED
from convscope.topk import TopK
from convscope.units import ScanResult, class_agreement, unit_agreement

Z = stats.norm.ppf(0.975)


def _t(values, null=0.0):
    """Student's t interval of a mean, from the definition."""
    a = np.asarray(values, float) - null
    half = stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return a.mean(), (a.mean() - half, a.mean() + half)


def _welch(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    m, half = a.mean() - b.mean(), stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    return m, (m - half, m + half)


# ------------------------------------------------------------------------------------------------ Fig. 2

# 12 images, 3 classes of 4: chance that two distinct images share a class is 3 * 4 * 3 / (12 * 11) = 3/11
LABELS = torch.arange(12) // 4
CHANCE = 3 / 11
# top-3 images per unit; agreement = ordered pairs of one class / 6: [0,1,2] -> 1, [8,9,0] -> 1/3, [0,4,8] -> 0
CLASSY = [[0, 1, 2], [4, 5, 6], [8, 9, 0], [9, 10, 11], [0, 1, 4], [5, 6, 7]]  # 1, 1, 1/3, 1, 1/3, 1
MIXED = [[0, 4, 8], [1, 5, 9], [2, 6, 10], [0, 1, 5], [3, 7, 11], [2, 4, 9]]  # 0, 0, 0, 1/3, 0, 0
NOISE = [[0, 1, 2], [0, 4, 8], [8, 9, 0], [1, 5, 9], [2, 6, 10], [0, 1, 5]]  # 1, 0, 1/3, 0, 0, 1/3


def _scan(images: dict[str, list], labels=LABELS, seen=12) -> ScanResult:
    idx = {layer: torch.tensor(v) for layer, v in images.items()}
    topk = TopK(3, {layer: -torch.arange(3.0).expand(len(i), 3) for layer, i in idx.items()}, idx,
                {layer: torch.zeros(len(i), 3, 2, dtype=torch.long) for layer, i in idx.items()}, seen=seen)
    return ScanResult(topk, "val", {}, ["deconvnet"], "error", {}, draw=None, labels=labels)


def test_fig2_upper_units_share_a_class_more_than_chance_and_more_than_lower_ones():
    result = _scan({"conv1": MIXED, "conv5": CLASSY})
    top = [1, 1, 1 / 3, 1, 1 / 3, 1]
    low = [0, 0, 0, 1 / 3, 0, 0]
    assert unit_agreement(result.topk, LABELS, "conv5").tolist() == pytest.approx(top)
    # class_agreement's chance, the squared class frequencies, is 1/3 here: above 3/11 for distinct images
    assert class_agreement(result.topk, LABELS, "conv5") == pytest.approx((7 / 9, 1 / 3))
    a, b = units.findings(result)
    assert (a.key, a.analysis, b.key) == ("fig2.conv5.class_agreement", "fig2", "fig2.conv1_conv5.agreement_rises")
    m, ci = _t(top, CHANCE)
    assert a.measured == pytest.approx(7 / 9 - CHANCE) == pytest.approx(m)
    assert a.interval == pytest.approx(ci) and a.verdict == HOLDS and a.n == 6
    m, ci = _welch(top, low)
    assert b.measured == pytest.approx(7 / 9 - 1 / 18) and b.interval == pytest.approx(ci) and b.verdict == HOLDS
    assert "conv1 0.06, conv5 0.78" in b.value and "chance 0.27" in a.value
    assert all(type(v) is float for f in (a, b) for v in (f.measured, *f.interval))


def test_fig2_verdict_turns_with_the_numbers():
    a, b = units.findings(_scan({"conv1": CLASSY, "conv5": MIXED}))  # the top layer is the mixed one
    assert a.measured == pytest.approx(1 / 18 - CHANCE) and a.verdict == REVERSED
    assert b.measured == pytest.approx(1 / 18 - 7 / 9) and b.verdict == REVERSED
    a, b = units.findings(_scan({"conv1": MIXED, "conv5": NOISE}))  # near chance, spread out
    assert a.measured == pytest.approx(5 / 18 - CHANCE) and a.verdict == NOT_SHOWN
    assert b.verdict == NOT_SHOWN


def test_fig2_claims_need_labels_and_a_full_scan():
    assert units.findings(_scan({"conv1": MIXED, "conv5": CLASSY}, labels=None)) == []
    assert units.findings(_scan({"conv1": MIXED, "conv5": CLASSY}, labels=torch.zeros(12, dtype=torch.long))) == []
    assert units.findings(_scan({"conv1": MIXED, "conv5": CLASSY}, seen=2)) == []
    only = units.findings(_scan({"conv5": CLASSY}))  # one layer: no rise to measure
    assert [f.key for f in only] == ["fig2.conv5.class_agreement"]
    # compute keeps the split's labels, a lookup: no copy the caller could change behind the scan's back
    data = ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 1, 0]), ["a", "b"])
    labels = units._labels(data)
    data.labels[0] = 1
    assert labels.tolist() == [0, 1, 1, 0]
    assert units._labels(SimpleNamespace()) is None


# ------------------------------------------------------------------------------------------------ Fig. 6

MAIN, AT10, ALEX, RAW = ("zfnet_small (30 ep)", "zfnet_small (30 ep) (epoch 10)", "alexnet_small (10 ep)",
                         "zfnet_small no renorm (30 ep)")
ZF_MID, ALEX_MID = [0.5, 0.6, 0.55, 0.65], [0.2, 0.3, 0.25, 0.35]
ZF_ALIAS, ALEX_ALIAS = [0.3, 0.25, 0.35, 0.2, 0.4], [0.6, 0.7, 0.5, 0.65, 0.55]
EVEN = torch.linspace(0.09, 0.11, 24, dtype=torch.float64)  # dominance 0.11 / 0.1 = 1.1
SPIKY = torch.tensor([0.1] * 18 + [0.3] * 6, dtype=torch.float64)  # 6 filters 3 times the median: dominance 3


def _diagnosis(mid, alias, rms=EVEN, kernel=7, stride=2) -> Diagnosis:
    mid = torch.tensor(mid, dtype=torch.float64)
    bands = torch.stack([0.9 - mid, mid, torch.full_like(mid, 0.1)], 1)
    median = float(torch.quantile(rms, 0.5))
    s = FilterStats("conv1", (kernel, kernel), (stride, stride), rms, bands, torch.zeros(len(mid)),
                    torch.zeros(len(rms), dtype=torch.bool), 0.05, 0.0, None,
                    dict(zip(filters.BANDS, bands.mean(0).tolist())), 0.0, float(rms.max()) / median)
    # ``alias`` above 1/4 cycle/px (stride 2's limit); 0.9 above each model's own limit, which the claim must not use
    per, own = torch.tensor(alias, dtype=torch.float64), torch.full((len(alias),), 0.9, dtype=torch.float64)
    return Diagnosis(s, Aliasing("conv2", (stride, stride), 0.9, own, {2: float(per.mean())}, [], torch.zeros(1),
                                 {2: per}), np.zeros((1, 1, 3), np.uint8))


def _fig6(zf_mid=ZF_MID, alex_mid=ALEX_MID, zf_alias=ZF_ALIAS, alex_alias=ALEX_ALIAS, raw=SPIKY, twin=EVEN,
          raw_renorm=False) -> FiltersResult:
    # The main run at 30 epochs has the lowest mid share and the most aliasing of all: comparing it with AlexNet's
    # 10 epochs (rather than its own epoch-10 weights) would show in every number.
    d = {MAIN: _diagnosis([0.1] * 4, [0.9] * 5, twin), AT10: _diagnosis(zf_mid, zf_alias),
         ALEX: _diagnosis(alex_mid, alex_alias, kernel=11, stride=4), RAW: _diagnosis([0.5] * 4, [0.3] * 5, raw)}
    recipes = {MAIN: {"model": "zfnet_small", "renorm": True, "epoch": 30},
               AT10: {"model": "zfnet_small", "renorm": True, "epoch": 10},
               ALEX: {"model": "alexnet_small", "renorm": True, "epoch": 10},
               RAW: {"model": "zfnet_small", "renorm": raw_renorm, "epoch": 30}}
    return FiltersResult(d, None, recipes)


def test_fig6_compares_like_with_like():
    mid, alias, dom = filters.findings(_fig6())
    assert [f.key for f in (mid, alias, dom)] == ["fig6.mid_frequency", "fig6.layer2_aliasing", "fig6.renorm_dominance"]
    m, ci = _welch(ZF_MID, ALEX_MID)
    assert mid.measured == pytest.approx(0.575 - 0.275) == pytest.approx(m)
    assert mid.interval == pytest.approx(ci) and mid.verdict == HOLDS and mid.n == 8
    assert "7x7 stride 2" in mid.claim and "11x11 stride 4" in mid.claim and AT10 in mid.contrast
    m, ci = _welch(ALEX_ALIAS, ZF_ALIAS)
    assert alias.measured == pytest.approx(0.6 - 0.3) and alias.interval == pytest.approx(ci)
    assert alias.verdict == HOLDS and alias.value == (f"above 1/4: 0.60 ({ALEX}) vs 0.30 ({AT10}); above each one's "
                                                      "own limit 0.90 vs 0.90")
    # max/median RMS: 3 without renormalisation, 1.1 with; every resample of 24 filters keeps a large one
    assert dom.measured == pytest.approx(3 - 1.1) and dom.verdict == HOLDS and dom.interval[0] > 1
    assert RAW in dom.contrast and MAIN in dom.contrast and "bootstrap" in dom.method
    assert all(type(v) is float for f in (mid, alias, dom) for v in (f.measured, *f.interval))


def test_fig6_verdict_turns_with_the_numbers():
    mid, alias, dom = filters.findings(_fig6(ALEX_MID, ZF_MID, ALEX_ALIAS, ZF_ALIAS, raw=EVEN, twin=SPIKY))
    assert mid.measured == pytest.approx(-0.3) and mid.verdict == REVERSED
    assert alias.measured == pytest.approx(-0.3) and alias.verdict == REVERSED
    assert dom.measured == pytest.approx(1.1 - 3) and dom.verdict == REVERSED
    noisy = EVEN[torch.randperm(24, generator=torch.Generator().manual_seed(0))] * 1.001
    mid, alias, dom = filters.findings(_fig6(ZF_MID, [0.55, 0.6, 0.5, 0.62], ZF_ALIAS, [0.25, 0.35, 0.3, 0.28, 0.33],
                                             raw=noisy, twin=EVEN))
    assert mid.measured == pytest.approx(0.575 - 0.5675) and mid.verdict == NOT_SHOWN
    assert alias.measured == pytest.approx(0.302 - 0.3) and alias.verdict == NOT_SHOWN
    assert dom.measured == pytest.approx(0.0, abs=1e-12) and dom.verdict == NOT_SHOWN


def test_fig6_claims_only_for_the_runs_present():
    result = _fig6(raw_renorm=True)  # no run without renormalisation
    assert [f.key for f in filters.findings(result)] == ["fig6.mid_frequency", "fig6.layer2_aliasing"]
    result.diagnoses[ALEX].aliasing.per_projection_at.clear()  # not measured at stride 2's limit: no common cutoff
    assert [f.key for f in filters.findings(result)] == ["fig6.mid_frequency"]
    del result.diagnoses[AT10]  # AlexNet at 10 epochs and ZF only at 30: no like-for-like pair
    assert filters.findings(result) == []
    assert filters.findings(FiltersResult({MAIN: _fig6().diagnoses[MAIN]})) == []
    trained = SimpleNamespace(config=SimpleNamespace(model="zfnet_small", renorm=False, epochs=30))
    assert filters._recipe(trained) == {"model": "zfnet_small", "renorm": False, "epoch": 30}
    assert filters._recipe(trained, 10)["epoch"] == 10 and filters._recipe(SimpleNamespace(config=None)) == {}


# ------------------------------------------------------------------------------------------------ Table 3


def _wilson(x, n):
    p = x / n
    centre, half = (p + Z * Z / (2 * n)) / (1 + Z * Z / n), Z / (1 + Z * Z / n) * math.sqrt(
        p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


def _ablation(errors: dict[str, float], n=500) -> AblationResult:
    rows = [AblationRow(v, {}, 1000, e, e, e, *ablation.VARIANTS[v][:1], (0, 0, 0), (0, 0, 0), f"runs/{v}", n)
            for v, e in errors.items()]
    return AblationResult({"model": "zfnet_small"}, rows)


def test_table3_depth_costs_more_than_either_removal():
    # pairs as the demo measures it: 0.2 % without conv3-4, 0 without fc6-7, 53 % without both
    (f,) = ablation.findings(_ablation({"full": 0.0, "no_conv34": 0.002, "no_fc67": 0.0, "no_conv34_fc67": 0.53}))
    assert (f.key, f.analysis, f.n) == ("table3.depth", "table3", 1000)
    assert f.measured == pytest.approx(0.528) and f.verdict == HOLDS
    (l1, u1), (l2, u2) = _wilson(265, 500), _wilson(1, 500)  # Newcombe: each side from the Wilson bounds
    assert f.interval == pytest.approx((0.528 - math.hypot(0.53 - l1, u2 - 0.002),
                                        0.528 + math.hypot(u1 - 0.53, 0.002 - l2)))
    assert "without conv3-4 alone" in f.contrast and "265 of 500 and 1 of 500" in f.method
    assert f.value == "53.0 % vs 0.2 (3,4) and 0.0 (6,7)"
    assert all(type(v) is float for v in (f.measured, *f.interval))


def test_table3_verdict_turns_with_the_numbers():
    (f,) = ablation.findings(_ablation({"no_conv34": 0.1, "no_fc67": 0.3, "no_conv34_fc67": 0.0}))
    assert f.measured == pytest.approx(-0.3) and f.verdict == REVERSED and "fc6-7 alone" in f.contrast
    (f,) = ablation.findings(_ablation({"no_conv34": 0.30, "no_fc67": 0.28, "no_conv34_fc67": 0.32}, n=100))
    assert f.measured == pytest.approx(0.02) and f.verdict == NOT_SHOWN


def test_table3_claim_needs_the_three_variants_and_their_val_size():
    assert ablation.findings(_ablation({"full": 0.1, "no_conv34": 0.1, "no_conv34_fc67": 0.5})) == []
    assert ablation.findings(_ablation({"no_conv34": 0.1, "no_fc67": 0.1, "no_conv34_fc67": 0.5}, n=0)) == []
    row = _ablation({"no_fc67": 0.1}).rows[0]
    assert row.val_images == 500 and _ablation({"no_fc67": 0.1}).to_dict()["rows"][0]["val_images"] == 500
