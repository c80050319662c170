"""Findings of Table 1 (correspondence), Fig. 5 (invariance) and Fig. 7 (occlusion): results built by hand, the
contrasts and intervals checked against hand-computed numbers, and the verdicts flipped by changing the numbers:
holds, reversed when the effect is turned round, not shown when it is noise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from convscope import correspondence, invariance, occlusion
from convscope.correspondence import RANDOM, CorrespondenceResult
from convscope.findings import HOLDS, NOT_SHOWN, REVERSED
from convscope.invariance import InvarianceCurves, InvarianceResult
from convscope.occluders import square_positions
from convscope.occlusion import OcclusionResult, OcclusionResults

T975_3 = 3.182446305284263  # Student's t, 97.5% quantile, 3 degrees of freedom
T975_2 = 4.302652729749464  # and 2


def t_interval(diffs: list[float], t: float) -> tuple[float, float]:
    n = len(diffs)
    m = sum(diffs) / n
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    return m - t * sd / math.sqrt(n), m + t * sd / math.sqrt(n)


def wilson(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# ------------------------------------------------------------------------------------------------ Table 1


def table1(part: dict[str, list[float]], rand: dict[str, list[float]], layers=("conv5", "fc7"),
           parts=("left_eye", "nose")) -> CorrespondenceResult:
    values = {r: {layer: torch.tensor(part[f"{r}.{layer}"] if r != RANDOM else rand[layer], dtype=torch.float64)
                  for layer in layers} for r in (*parts, RANDOM)}
    return CorrespondenceResult(layers=tuple(layers), regions=(*parts, RANDOM), values=values, size=8, n_images=5,
                                draws=4, seed=0)


RAND = {"conv5": [0.30, 0.32, 0.29, 0.31], "fc7": [0.28, 0.27, 0.29, 0.28]}
EYE = [0.20, 0.23, 0.21, 0.22]  # 0.10, 0.09, 0.08, 0.09 below random at conv5, draw by draw
NOISE = [0.01, -0.01, 0.02, -0.02]


def test_table1_contrast_interval_and_verdict():
    parts = {"left_eye.conv5": EYE, "nose.conv5": [r + e for r, e in zip(RAND["conv5"], NOISE)],
             "left_eye.fc7": [r + 0.05 for r in RAND["fc7"]], "nose.fc7": [0.21, 0.20, 0.22, 0.21]}
    fs = {f.key: f for f in correspondence.findings(table1(parts, RAND))}
    assert list(fs) == ["table1.conv5.left_eye", "table1.conv5.nose", "table1.fc7.left_eye", "table1.fc7.nose"]
    eye = fs["table1.conv5.left_eye"]
    assert eye.measured == pytest.approx(0.09) and isinstance(eye.measured, float)
    assert eye.interval == pytest.approx(t_interval([0.10, 0.09, 0.08, 0.09], T975_3))
    assert eye.interval == pytest.approx((0.07701, 0.10299), abs=1e-5)
    assert eye.verdict == HOLDS and eye.n == 4 and eye.analysis == "table1"
    assert eye.source == "Zeiler & Fergus 2014, Table 1" and eye.paper == "layer 5: 0.069 vs 0.107"
    assert eye.value == "0.215 vs 0.305"
    assert "left eye" in eye.claim and "conv5" in eye.claim and " on " not in eye.claim
    # noise: the nose is as often above random as below it
    assert fs["table1.conv5.nose"].measured == pytest.approx(0.0, abs=1e-12)
    assert fs["table1.conv5.nose"].verdict == NOT_SHOWN
    # every draw 0.05 above random: exactly reversed (no spread)
    assert fs["table1.fc7.left_eye"].measured == pytest.approx(-0.05)
    assert fs["table1.fc7.left_eye"].verdict == REVERSED
    assert fs["table1.fc7.nose"].verdict == HOLDS and fs["table1.fc7.nose"].measured == pytest.approx(0.07)
    assert fs["table1.fc7.nose"].paper == "layer 7: 0.069 vs 0.073 (no difference at layer 7)"


def test_table1_turned_round_and_noise():
    base = {"left_eye.conv5": EYE, "nose.conv5": EYE, "left_eye.fc7": EYE, "nose.fc7": EYE}
    assert correspondence.findings(table1(base, RAND))[0].verdict == HOLDS
    # the part's and random's Deltas swapped: the same contrast, negative
    swapped = {**base, "left_eye.conv5": RAND["conv5"]}
    f = correspondence.findings(table1(swapped, {**RAND, "conv5": EYE}))[0]
    assert f.measured == pytest.approx(-0.09) and f.verdict == REVERSED
    assert f.interval == pytest.approx((-0.10299, -0.07701), abs=1e-5)
    noisy = {**base, "left_eye.conv5": [r + e for r, e in zip(RAND["conv5"], NOISE)]}
    assert correspondence.findings(table1(noisy, RAND))[0].verdict == NOT_SHOWN


def test_table1_labels_for_a_second_data_set_and_other_layers():
    parts = {"left_eye.layer3": EYE, "mouth.layer3": EYE, "left_eye.fc": EYE, "mouth.fc": EYE}
    result = table1(parts, {"layer3": RAND["conv5"], "fc": RAND["conv5"]}, layers=("layer3", "fc"),
                    parts=("left_eye", "mouth"))
    fs = correspondence.findings(result, analysis="table1_parts", data="synthetic-parts")
    assert [f.key for f in fs] == ["table1_parts.layer3.left_eye", "table1_parts.layer3.mouth",
                                   "table1_parts.fc.left_eye", "table1_parts.fc.mouth"]
    assert all(f.analysis == "table1_parts" and f.claim.endswith("on synthetic-parts") for f in fs)
    # layers matched to the paper's 5 and 7 by position; a part the paper did not mask says so
    assert fs[0].paper == "layer 5: 0.069 vs 0.107" and fs[2].paper.startswith("layer 7: 0.068 vs 0.073")
    assert fs[1].paper == "not in the paper (eyes and nose only)"
    assert all(f.verdict == HOLDS and f.measured == pytest.approx(0.09) for f in fs)


# ------------------------------------------------------------------------------------------------ Fig. 5

SHIFTS = [-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0]  # at 64 px only -4..4 (not 0) count: up to H/16 = 4 px


def fig5(first: list[float], last: list[float], mode: str = "warp", layers=("conv1", "fc7")) -> InvarianceResult:
    """Three images; each image's small-shift distances all equal to its entry of ``first`` / ``last``; the 0 px
    and 8 px steps hold values that would turn the contrast round if they were counted."""
    def rows(small: list[float], big: float) -> torch.Tensor:
        return torch.tensor([[big, v, v, 0.0, v, v, big] for v in small])

    distance = {layers[0]: rows(first, 0.0), layers[-1]: rows(last, 50.0)}
    curve = InvarianceCurves("translation", torch.tensor(SHIFTS), distance, distance, torch.full((3, 7), 0.5),
                             torch.zeros(3, 3, 64, 64))
    return InvarianceResult(layers=tuple(layers), labels=torch.tensor([0, 1, 2]), mode=mode,
                            curves={"translation": curve})


def test_fig5_contrast_interval_and_verdict():
    (f,) = invariance.findings(fig5([0.9, 0.8, 1.0], [0.3, 0.2, 0.25]))
    assert f.key == "fig5.translation" and f.analysis == "fig5" and f.source == "Zeiler & Fergus 2014, Fig. 5"
    assert f.measured == pytest.approx(0.65) and isinstance(f.measured, float)  # (0.6 + 0.6 + 0.75) / 3
    assert f.interval == pytest.approx(t_interval([0.6, 0.6, 0.75], T975_2))
    assert f.verdict == HOLDS and f.n == 3
    assert f.value == "0.90 (conv1) vs 0.25 (fc7)" and "up to 4 px" in f.claim and "warped" in f.claim


def test_fig5_turned_round_noise_and_modes():
    (f,) = invariance.findings(fig5([0.3, 0.2, 0.25], [0.9, 0.8, 1.0]))
    assert f.measured == pytest.approx(-0.65) and f.verdict == REVERSED
    (f,) = invariance.findings(fig5([0.5, 0.6, 0.4], [0.6, 0.5, 0.4]))
    assert f.measured == pytest.approx(0.0, abs=1e-7) and f.verdict == NOT_SHOWN
    # both modes run in one demo: the keys and analyses differ
    (r,) = invariance.findings(fig5([0.9, 0.8, 1.0], [0.3, 0.2, 0.25], mode="render"))
    assert r.key == "fig5_render.translation" and r.analysis == "fig5_render" and "re-rendered" in r.claim
    assert r.measured == pytest.approx(0.65)
    assert invariance.findings(fig5([0.9] * 3, [0.3] * 3), analysis="x")[0].key == "x.translation"


def test_fig5_nothing_to_claim():
    assert invariance.findings(fig5([0.9] * 3, [0.3] * 3, layers=("pixels",))) == []
    r = fig5([0.9] * 3, [0.3] * 3)
    r.curves["translation"].values = torch.tensor([-16.0, -12.0, -8.0, 0.0, 8.0, 12.0, 16.0])  # no shift <= 4 px
    assert invariance.findings(r) == []


# ------------------------------------------------------------------------------------------------ Fig. 7

POSITIONS = square_positions(16, 16, 4, 4)  # centres 2, 6, 10, 14 on each axis
BOX = [4.0, 4.0, 12.0, 12.0]  # holds the centres 6 and 10 on each axis: 4 of 16 positions, chance 0.25


def image(worst: tuple[int, int], label: int = 1, predicted: int = 1) -> OcclusionResult:
    """One image whose lowest p(label) is at grid position ``worst`` (row, col)."""
    prob = torch.full((4, 4), 0.9)
    prob[worst] = 0.1
    return OcclusionResult(image=torch.zeros(3, 16, 16), label=label, layer="conv5", channel=0, size=4, stride=4,
                           fill=torch.zeros(3), positions=POSITIONS, activation=torch.zeros(4, 4),
                           projection=torch.zeros(3, 16, 16), prob=prob, top_class=torch.zeros(4, 4, dtype=torch.long),
                           prob_clean=0.9, activation_clean=1.0, predicted=predicted)


def fig7(hits: int, n: int = 20, extra: bool = True) -> OcclusionResults:
    """``n`` correctly classified images, ``hits`` of them most harmed on the object (centre (6, 6)), the others
    off it (centre (2, 2)); ``extra`` adds images that must not count: misclassified, labelled by the model's
    prediction, and without a box, each most harmed off the object."""
    images = [image((1, 1) if i < hits else (0, 0)) for i in range(n)]
    source, boxes = ["true"] * n, [BOX] * n
    if extra:
        images += [image((0, 0), predicted=0), image((0, 0)), image((0, 0))]
        source += ["true", "predicted", "true"]
        boxes += [BOX, BOX, [math.nan] * 4]
    return OcclusionResults(images, ["a", "b"], source, boxes=torch.tensor(boxes))


def test_fig7_contrast_interval_and_verdict():
    (f,) = occlusion.findings(fig7(18))
    assert f.key == "fig7.on_object" and f.analysis == "fig7" and f.source == "Zeiler & Fergus 2014, Fig. 7"
    assert f.n == 20 and f.measured == pytest.approx(18 / 20 - 0.25) and isinstance(f.measured, float)
    lo, hi = wilson(18, 20)
    assert f.interval == pytest.approx((lo - 0.25, hi - 0.25))
    assert f.interval == pytest.approx((0.44897, 0.72213), abs=1e-5)
    assert f.verdict == HOLDS and f.value == "18 of 20 in the box (chance 0.25)"


def test_fig7_turned_round_noise_and_no_truth():
    (f,) = occlusion.findings(fig7(0))
    assert f.measured == pytest.approx(-0.25) and f.verdict == REVERSED  # Wilson's upper bound 0.161 < 0.25
    assert f.interval[1] == pytest.approx(wilson(0, 20)[1] - 0.25)
    (f,) = occlusion.findings(fig7(5))  # at chance
    assert f.measured == pytest.approx(0.0) and f.verdict == NOT_SHOWN
    no_truth = fig7(18)
    no_truth.boxes = None
    assert occlusion.findings(no_truth) == []
    assert occlusion.findings(fig7(0, n=0)) == []  # no image correctly classified with a box


def test_fig7_chance_is_the_mean_share_of_positions_in_the_box():
    r = fig7(2, n=2, extra=False)
    r.boxes = torch.tensor([BOX, [0.0, 0.0, 16.0, 8.0]])  # 4 and 8 of 16 centres: chance (0.25 + 0.5) / 2
    (f,) = occlusion.findings(r)
    assert f.measured == pytest.approx(1.0 - 0.375) and f.value == "2 of 2 in the box (chance 0.38)"


class TinyNet(nn.Module):
    """Untrained, any image size: a 3x3 conv, ReLU, mean over the image, a linear head."""

    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2, classes)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean((-2, -1)))


def test_occlusion_records_the_clean_prediction():
    torch.manual_seed(0)
    model = TinyNet(3).eval()
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    r = occlusion.occlusion(model, x, 0, layer="relu", size=4, stride=4)
    with torch.no_grad():
        assert r.predicted == int(model(x[None]).argmax())


def test_compute_keeps_the_ground_truth_boxes(tmp_path):
    from helpers import random_imageset

    import convscope as cs
    from convscope.data.synthetic import load_synthetic

    data = load_synthetic("test", n=24, size=32, cache=False)
    torch.manual_seed(0)
    run = cs.attach(TinyNet(len(data.classes)), data, tmp_path / "run", image_size=32)
    r = occlusion.compute(run, n=3, size=16, stride=16)
    shown = run.split(run.default_split("test"))
    torch.testing.assert_close(torch.stack([i.image for i in r.images]), shown.batch(torch.arange(3))[0])
    torch.testing.assert_close(r.boxes, shown.truth.boxes[:3])
    (f,) = occlusion.findings(r)
    correct = [i for i in r.images if i.predicted == i.label]
    assert f.n == len(correct) and f.n > 0
    # data without ground truth: no boxes, no claim
    plain = cs.attach(TinyNet(2), random_imageset([0, 1, 0, 1], size=32), tmp_path / "plain", image_size=32)
    r = occlusion.compute(plain, n=2, size=16, stride=16)
    assert r.boxes is None and occlusion.findings(r) == []
