"""Occlusion sensitivity (paper Fig. 7): a hand-computed model, Captum's Occlusion as an oracle, independence of
the batch size, the writer, bad input, and on a trained net: the most sensitive position is on the object."""

from __future__ import annotations

import json
import math
import warnings

import captum.attr as captum_attr
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
from convscope.errors import ConvscopeError
from convscope.layout import Layout
from convscope.occluders import default_fill, occlude, square_positions
from convscope.occlusion import OcclusionResults, box_hit, occlusion, write_occlusion


class RegionNet(nn.Module):
    """Class 0's logit is (red over the 4x4 region rows/cols 2..5) - 14; class 1's is 0. On an image that is red
    exactly there, p(0) = sigmoid(2); a 2x2 black square inside the region makes it sigmoid(-2) and flips the
    top class."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
        self.relu = nn.ReLU()

    def forward(self, x):
        s = self.relu(self.conv(x))[:, 0, 2:6, 2:6].sum((-2, -1))
        return torch.stack([s - 14, torch.zeros_like(s)], 1)


def region_image() -> torch.Tensor:
    x = torch.zeros(3, 8, 8)
    x[0, 2:6, 2:6] = 1.0
    return x


def test_hand_computed_panels():
    r = occlusion(RegionNet(), region_image(), 0, layer="relu", size=2, stride=2, fill=0.0)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 1:3] = True
    assert r.positions.shape == (4, 4, 2) and r.positions[1, 2].tolist() == [2, 4]
    sig = torch.sigmoid
    assert r.prob_clean == pytest.approx(float(sig(torch.tensor(2.0))), abs=1e-6)
    torch.testing.assert_close(r.prob, torch.where(inside, sig(torch.tensor(-2.0)), sig(torch.tensor(2.0))))
    assert r.top_class.tolist() == inside.long().tolist()
    assert r.channel == 0 and r.activation_clean == 16.0
    torch.testing.assert_close(r.activation, torch.where(inside, 12.0, 16.0))
    # (c): the strongest activation (the first of the equal ones, pixel (2, 2)) seeded with its value 1,
    # through a ReLU and a 1x1 conv that reads only red: a single 1 at red (2, 2).
    expected = torch.zeros(3, 8, 8)
    expected[0, 2, 2] = 1.0
    torch.testing.assert_close(r.projection, expected)
    assert r.most_sensitive() == (2, 2)
    assert box_hit(r, (2, 2, 6, 6)) and not box_hit(r, (5, 5, 8, 8))


def test_default_fill_is_the_mean_colour():
    assert default_fill(RegionNet(), region_image()).tolist() == [0.25, 0.0, 0.0]
    model = cs.create_model("zfnet_small", 4)
    with torch.no_grad():
        model.normalize.mean.copy_(torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1).expand(3, 64, 64))
    torch.testing.assert_close(default_fill(model, torch.rand(3, 64, 64)), torch.tensor([0.2, 0.4, 0.6]))


def test_occlude_pastes_squares_clipped():
    out = occlude(torch.ones(1, 5, 5), torch.tensor([[0, 0], [3, 4]]), 2, torch.tensor([0.0]))
    assert out.shape == (2, 1, 5, 5)
    assert out[0, 0].sum() == 25 - 4 and out[0, 0, :2, :2].sum() == 0
    assert out[1, 0].sum() == 25 - 2 and out[1, 0, 3:5, 4].sum() == 0


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))
    with torch.no_grad():
        model[-1].weight.mul_(20)  # probabilities that move by tenths, so the comparison means something
    return model.eval()


@pytest.mark.parametrize("name", ["small_cnn", "zfnet_small"])
def test_equals_captum_occlusion(name):
    torch.manual_seed(1)
    if name == "small_cnn":
        model, image, size, layer = small_cnn(), torch.rand(3, 16, 16), 4, "4"
    else:
        model = cs.create_model("zfnet_small", 6, conv1_std=None).eval()  # He throughout: logits that move
        image, size, layer = torch.rand(3, 64, 64), 16, "conv5"
    fill = torch.tensor([0.3, 0.5, 0.7])
    label = int(model(image[None]).argmax())
    r = occlusion(model, image, label, layer=layer, size=size, stride=size, fill=fill, batch_size=3)
    # Windows that tile the image without overlap: Captum's per-pixel attribution is p(clean) - p(occluded by
    # the square covering that pixel), the same value over all channels.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr = captum_attr.Occlusion(lambda x: model(x).softmax(-1)[:, label]).attribute(
            image[None], sliding_window_shapes=(3, size, size), strides=(3, size, size),
            baselines=fill.view(1, 3, 1, 1).expand(1, 3, *image.shape[-2:]))
    expected = r.prob_clean - r.prob.repeat_interleave(size, 0).repeat_interleave(size, 1)
    assert expected.abs().max() > 1e-3  # occluding matters, or the test would prove nothing
    torch.testing.assert_close(attr[0], expected.expand(3, -1, -1), atol=1e-5, rtol=0)


def test_batch_size_does_not_matter():
    model, image = small_cnn(), torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    results = [occlusion(model, image, 1, layer="3", size=5, stride=3, batch_size=b) for b in (1, 4, 1000)]
    for r in results[1:]:
        torch.testing.assert_close(r.prob, results[0].prob, atol=1e-6, rtol=0)
        torch.testing.assert_close(r.activation, results[0].activation, atol=1e-5, rtol=1e-6)
        assert torch.equal(r.top_class, results[0].top_class) and r.channel == results[0].channel
    assert results[0].prob.shape == (4, 4)


def test_write_occlusion(tmp_path):
    r = occlusion(RegionNet(), region_image(), 0, layer="relu", size=2, stride=2, fill=0.0)
    png, js = write_occlusion(OcclusionResults([r, r], ["red", "other"], ["true", "predicted"]), Layout(tmp_path))
    assert png == tmp_path / "figures" / "fig7.png"
    assert Image.open(png).size[0] > 500
    data = json.loads(js.read_text())["images"][0]
    assert data["label"] == "red" and data["top_class"][1][1] == "other" and data["top_class"][0][0] == "red"
    assert data["label_source"] == "true" and json.loads(js.read_text())["images"][1]["label_source"] == "predicted"
    assert data["prob"][1][1] == pytest.approx(1 / (1 + math.exp(2)), abs=1e-6)
    assert data["most_sensitive"] == [2, 2]


def test_bad_input():
    model, image = RegionNet(), region_image()
    with pytest.raises(ConvscopeError, match=r"larger than the image \(8x8\).*1 to 8"):
        occlusion(model, image, 0, layer="relu", size=9)
    with pytest.raises(ConvscopeError, match="stride must be a positive integer"):
        occlusion(model, image, 0, layer="relu", size=2, stride=0)
    with pytest.raises(ConvscopeError, match="size must be a positive integer"):
        square_positions(8, 8, 0, 1)
    with pytest.raises(ConvscopeError, match="batch_size"):
        occlusion(model, image, 0, layer="relu", size=2, batch_size=0)
    with pytest.raises(ConvscopeError, match="label 5 out of range"):
        occlusion(model, image, 5, layer="relu", size=2)
    with pytest.raises(ConvscopeError, match=r"3 values \(one per channel\)"):
        occlusion(model, image, 0, layer="relu", size=2, fill=[0.5, 0.5])
    with pytest.raises(ConvscopeError, match="valid layers: .*relu"):
        occlusion(model, image, 0, layer="conv9", size=2)
    with pytest.raises(ConvscopeError, match="one image"):
        occlusion(model, image.expand(2, 3, 8, 8), 0, layer="relu", size=2)


@pytest.mark.slow
def test_trained_net_is_most_sensitive_on_the_object(trained_zf, untrained_zf, measured):
    """Section 4.2: occluding the object, not its context, lowers the correct class most (12 px, stride 4)."""
    model, data = trained_zf
    x, y = data.batch(torch.arange(60))
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).nonzero().flatten().tolist()
    hits = [box_hit(occlusion(model, x[i], int(y[i]), size=12, stride=4, batch_size=256), data.truth.boxes[i])
            for i in correct]
    measured("fig7.correct", len(correct))
    measured("fig7.hit_fraction", sum(hits) / len(hits))
    assert len(correct) >= 15
    assert sum(hits) / len(hits) >= 0.8
    with torch.no_grad():  # the untrained control classifies too few images right to have a most harmful square
        control = int((untrained_zf[0](x).argmax(1) == y).sum())
    measured("control.fig7.correct", control)
    assert not control >= 15
