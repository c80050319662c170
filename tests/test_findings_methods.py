"""The findings of the pointing game (TorchRay), the sanity checks (Adebayo et al. 2018), the probes (Table 7) and
transfer (Tables 4-5): results built by hand, the contrast and its interval computed by hand, and the verdict
following the numbers (holds, reversed when the effect is turned round, not shown when it is noise)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from convscope import pointing, probes, sanity, transfer
from convscope.findings import HOLDS, NOT_SHOWN, REVERSED, read_findings, write_findings


def t_interval(d):
    """Student's t 95% interval of the mean of ``d``, written out."""
    d = np.asarray(d, dtype=np.float64)
    n, m = len(d), float(np.mean(d))
    sem = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * sem
    return m, (m - half, m + half)


def check(f, d, verdict):
    m, (lo, hi) = t_interval(d)
    assert f.measured == pytest.approx(m, abs=1e-12) and type(f.measured) is float
    assert f.interval == pytest.approx((lo, hi), abs=1e-9) and f.n == len(d)
    assert f.verdict == verdict


# ------------------------------------------------------------------------------------------------ pointing


def _pointing(method_hits, centre_hits, labels):
    h = {"center": {"true": torch.tensor(centre_hits, dtype=torch.bool)}}
    for m in ("deconvnet", "guided", "gradient", "occlusion"):
        h[m] = {"true": torch.tensor(method_hits, dtype=torch.bool)}
    n = len(labels)
    return pointing.PointingResult(h, torch.tensor(labels), torch.zeros(n, dtype=torch.bool), ["a", "b"], 4.3, 64)


def test_pointing_finding_is_the_hit_rate_over_the_centre_paired_over_images():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    method, centre = [1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0, 1, 0]
    fs = pointing.findings(_pointing(method, centre, labels))
    assert [f.key for f in fs] == ["pointing.deconvnet", "pointing.guided", "pointing.gradient", "pointing.occlusion"]
    d = np.subtract(method, centre)  # 1, 0, 1, 1, 1, 1, 0, 0: 0.625
    for f in fs:
        check(f, d, HOLDS)
        assert f.analysis == "pointing" and f.interval[0] == pytest.approx(0.625 - 0.43268, abs=1e-4)
    assert fs[0].paper == "VOC07, VGG-16: 67.5% vs centre 69.6%" and fs[3].paper == "not in TorchRay's table"
    assert fs[0].value == "87.5% vs centre 25.0% (8 images)"
    # the centre hits where the maps miss: reversed
    assert {f.verdict for f in pointing.findings(_pointing(centre, method, labels))} == {REVERSED}
    # as many wins as losses: not shown
    noise = [1, 0, 0, 0, 1, 0, 1, 0]
    fs = pointing.findings(_pointing(noise, [0, 1, 0, 0, 0, 1, 1, 0], labels))
    assert fs[0].measured == 0.0 and fs[0].verdict == NOT_SHOWN


def test_pointing_weights_images_so_the_contrast_is_the_mean_over_classes():
    # class 0: 3 images, class 1: one. Method 3/3 and 0/1, centre 0/3 and 1/1: both 0.5 over classes
    r = _pointing([1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1])
    f = pointing.findings(r)[0]
    assert r.accuracy("deconvnet") == r.accuracy("center") == 0.5
    check(f, [2 / 3, 2 / 3, 2 / 3, -2], NOT_SHOWN)  # N / (classes x class size): 4 / 6 and 4 / 2
    assert f.measured == pytest.approx(0.0, abs=1e-12)
    assert pointing.findings(pointing.PointingResult({}, torch.tensor([0]), torch.tensor([False]), ["a"], 1, 8)) == []


# ------------------------------------------------------------------------------------------------ sanity


LAYERS = ["classifier.fc8", "classifier.fc7", "classifier.fc6", "features.conv1", ""]


def _sanity(guided_fc6, gradient_fc6, last, order="top_down", layers=LAYERS):
    rows = len(layers)
    rho = {}
    for m, at_fc6 in (("guided", guided_fc6), ("gradient", gradient_fc6)):
        r = np.full((rows, len(at_fc6)), 0.8)
        r[2], r[-1] = at_fc6, last
        rho[m] = r
    empty = {m: np.zeros((rows, len(last))) for m in rho}
    return sanity.SanityResult(layers, order, 42, torch.zeros(len(last), 3, 2, 2), torch.zeros(len(last)),
                               {m: [] for m in rho}, rho, empty, empty, empty)


def test_sanity_guided_backprop_stays_closer_than_the_gradient_after_fc6():
    guided, gradient, last = [0.9, 0.95, 0.97, 0.92], [0.6, 0.5, 0.7, 0.65], [0.3, 0.25, 0.35, 0.3]
    fs = {f.key: f for f in sanity.findings(_sanity(guided, gradient, last))}
    assert sorted(fs) == ["sanity.gradient.all_random", "sanity.guided.all_random", "sanity.guided_vs_gradient"]
    g = fs["sanity.guided_vs_gradient"]
    check(g, [0.3, 0.45, 0.27, 0.27], HOLDS)  # 0.3225
    assert "through classifier.fc6" in g.claim and g.value == "guided 0.94, gradient 0.61 (4 images)"
    check(fs["sanity.guided.all_random"], [0.7, 0.75, 0.65, 0.7], HOLDS)
    assert {f.analysis for f in fs.values()} == {"sanity"}
    # the gradient barely moving and guided backprop moving: reversed
    assert sanity.findings(_sanity(gradient, guided, last))[0].verdict == REVERSED
    # the two alike up to noise, and maps that stay the trained one's with every layer random: not shown
    fs = sanity.findings(_sanity(guided, [0.91, 0.94, 0.98, 0.91], [1.0, 0.9, 1.0, 1.0]))
    assert fs[0].measured == pytest.approx(0.0, abs=1e-12) and fs[0].verdict == NOT_SHOWN
    check(fs[1], [0.0, 0.1, 0.0, 0.0], NOT_SHOWN)


def test_sanity_leaves_out_images_without_a_correlation_and_states_the_depth():
    guided, gradient, last = [0.9, 0.95, math.nan, 0.92], [0.6, 0.5, 0.7, 0.65], [0.3, math.nan, 0.35, 0.3]
    fs = sanity.findings(_sanity(guided, gradient, last))
    check(fs[0], [0.3, 0.45, 0.27], HOLDS)  # a constant map has no rank correlation: its image is left out
    check(fs[1], [0.7, 0.65, 0.7], HOLDS)
    # one module at a time (independent): fc6 alone, and no step where every layer is random
    fs = sanity.findings(_sanity([0.9, 0.95, 0.97, 0.92], gradient, last, order="independent"))
    assert [f.key for f in fs] == ["sanity.guided_vs_gradient"] and "only classifier.fc6 randomised" in fs[0].claim
    # a model without fc6: every step averaged per image (rows 0.8 but fc6's and the last)
    layers = ["head", "body", "stem", "x", ""]
    f = sanity.findings(_sanity([0.9, 0.95, 0.97, 0.92], gradient, [0.3, 0.25, 0.35, 0.3], layers=layers))[0]
    check(f, [0.3 / 5, 0.45 / 5, 0.27 / 5, 0.27 / 5], HOLDS)
    assert "every step of randomisation, averaged" in f.claim


# ------------------------------------------------------------------------------------------------ probes


def _probes(first, last, labels):
    correct = {"svm": {"conv1": [bool(v) for v in first], "conv5": [True] * len(first),
                       "fc7": [bool(v) for v in last]}}
    accuracy = {"svm": {la: float(np.mean(c)) for la, c in correct["svm"].items()}}  # shown in the value only
    return probes.ProbeResult(["conv1", "conv5", "fc7"], {"conv1": 8, "conv5": 8, "fc7": 8}, accuracy, ["a", "b"],
                              5, 10, len(labels), "max", 2, 0, correct=correct, test_labels=list(labels))


def test_probe_finding_is_the_deepest_layer_over_the_first_paired_over_test_examples():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    first, last = [0, 1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]
    [f] = probes.findings(_probes(first, last, labels))
    assert f.key == "table7.svm.conv1_vs_fc7" and f.analysis == "table7"
    check(f, np.subtract(last, first), HOLDS)  # 1, 0, 1, 1, 0, 1, 1, 0: 0.625
    assert f.paper == "Caltech-101, 30 per class: conv1 44.8%, conv5 86.2%"
    assert f.value == "conv1 25.0%, fc7 87.5% (8 test examples)"
    assert probes.findings(_probes(last, first, labels))[0].verdict == REVERSED
    f = probes.findings(_probes(first, [1, 0, 0, 0, 0, 1, 0, 0], labels))[0]  # two gained, two lost
    assert f.measured == 0.0 and f.verdict == NOT_SHOWN
    # uneven classes: each example weighted so the mean is the mean per-class accuracy's difference
    [f] = probes.findings(_probes([0, 0, 0, 1], [1, 1, 1, 0], [0, 0, 0, 1]))
    check(f, [2 / 3, 2 / 3, 2 / 3, -2], NOT_SHOWN)  # (3/3 + 0/1) / 2 - (0/3 + 1/1) / 2 = 0
    # no softmax correctness recorded, or a single layer: nothing to pair
    assert probes.findings(_probes(first, last, labels), classifier="softmax") == []


def test_probe_layers_records_each_examples_correctness():
    from helpers import random_imageset

    import convscope as cs

    torch.manual_seed(0)
    model = cs.create_model("zfnet_small", 3).eval()
    train, test = random_imageset([0, 1, 2] * 3), random_imageset([0, 1, 2, 0, 1], seed=1)
    r = probes.probe_layers(model, train, test, layers=["conv1", "fc7"], classifiers=("svm",))
    assert r.test_labels == test.labels.tolist() and sorted(r.correct["svm"]) == ["conv1", "fc7"]
    for layer, right in r.correct["svm"].items():
        assert len(right) == 5 and all(isinstance(v, bool) for v in right)
        # the correctness is what the accuracy counts: per class, then averaged
        per_class = [np.mean([c for c, y in zip(right, r.test_labels) if y == k]) for k in range(3)]
        assert r.accuracy["svm"][layer] == pytest.approx(np.mean(per_class))
    assert probes.findings(r)[0].measured == pytest.approx(r.accuracy["svm"]["fc7"] - r.accuracy["svm"]["conv1"])


# ------------------------------------------------------------------------------------------------ transfer


def _transfer(fc7, all_, scratch, target="heldout"):
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return transfer.TransferResult([1, 5], 3, list("abcdef"), {"fc7": ["fc7"], "all": ["conv1", "fc7"]},
                                   {"fc7": t(fc7), "all": t(all_)}, t(scratch), {}, 60, 0, 300, target)


SCRATCH = [[0.2, 0.15, 0.18], [0.4, 0.5, 0.45]]


def test_transfer_finding_is_frozen_over_scratch_paired_over_folds_at_the_fewest_shots():
    r = _transfer([[0.5, 0.45, 0.55], [0.6, 0.6, 0.6]], [[0.2, 0.1, 0.25], [0.3, 0.3, 0.3]], SCRATCH)
    fc7, all_ = transfer.findings(r)
    assert (fc7.key, all_.key) == ("transfer.heldout.fc7.n1", "transfer.heldout.all.n1")
    assert {fc7.analysis, all_.analysis} == {"transfer_heldout"} and "on heldout" in fc7.claim
    check(fc7, [0.3, 0.3, 0.37], HOLDS)  # 0.3233, t over 3 folds
    assert fc7.interval[0] == pytest.approx(0.2229, abs=1e-4)
    check(all_, [0.0, -0.05, 0.07], NOT_SHOWN)  # the folds disagree
    assert "conv1..fc7 joined" in all_.claim and fc7.paper == "Caltech-101, 15 per class: 83.8% pretrained vs 22.8% " \
                                                               "from scratch"
    assert fc7.value == "50.0% vs 17.7% from scratch (3 folds, chance 16.7%)"
    # scratch above the frozen features at every fold: reversed
    down = transfer.findings(_transfer(SCRATCH, SCRATCH, [[0.5, 0.45, 0.55], [0.6, 0.6, 0.6]]))
    assert [f.verdict for f in down] == [REVERSED, REVERSED]
    # at 5 per class
    fc7, _ = transfer.findings(r, shots=5)
    check(fc7, [0.2, 0.1, 0.15], HOLDS)
    assert fc7.key == "transfer.heldout.fc7.n5" and transfer.findings(r, shots=7) == []
    r.scratch = None
    assert transfer.findings(r) == []


def test_two_targets_findings_live_side_by_side(tmp_path):
    fc7, all_ = [[0.5, 0.45, 0.55], [0.6, 0.6, 0.6]], [[0.2, 0.1, 0.25], [0.3, 0.3, 0.3]]
    path = tmp_path / "findings.json"
    # the registry replaces its key's entries ("transfer") and the findings' own analyses (transfer_<target>)
    write_findings(path, transfer.findings(_transfer(fc7, all_, SCRATCH, "digits")), ["transfer"])
    write_findings(path, transfer.findings(_transfer(fc7, all_, SCRATCH, "heldout")), ["transfer"])
    write_findings(path, transfer.findings(_transfer(SCRATCH, all_, fc7, "digits")), ["transfer"])  # rerun digits
    got = {f.key: f.verdict for f in read_findings(path)}
    assert got == {"transfer.heldout.fc7.n1": HOLDS, "transfer.heldout.all.n1": NOT_SHOWN,
                   "transfer.digits.fc7.n1": REVERSED, "transfer.digits.all.n1": REVERSED}


def test_transfer_finding_checks_the_cause_against_the_same_nets_untrained_features():
    """Random conv features transfer well to a simple target: pretraining is credited only with what the
    pretrained features add over the same net untrained."""
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    r = _transfer([[0.5, 0.45, 0.55], [0.6, 0.6, 0.6]], [[0.5, 0.45, 0.55], [0.6, 0.6, 0.6]], SCRATCH)
    r.untrained = {"fc7": t([[0.2, 0.25, 0.2], [0.3, 0.3, 0.3]]), "all": t([[0.6, 0.55, 0.62], [0.7, 0.7, 0.7]])}
    found = {f.key: f for f in transfer.findings(r)}
    fc7, all_ = found["transfer.heldout.fc7.n1.untrained"], found["transfer.heldout.all.n1.untrained"]
    check(fc7, [0.3, 0.2, 0.35], HOLDS)
    check(all_, [-0.1, -0.1, -0.07], REVERSED)  # untrained features beat the pretrained ones at every fold
    assert fc7.value == "50.0% vs 21.7% untrained (3 folds)" and fc7.analysis == "transfer_heldout"
