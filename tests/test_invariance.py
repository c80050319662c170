"""Invariance (paper Fig. 5): exact warps, the distances and probabilities of a model whose layer is the image
itself, re-rendering, the writer, bad input, and on a trained net: layer 1 moves more than layer 7."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from convscope.data.synthetic import load_synthetic
from convscope.errors import ConvscopeError
from convscope.invariance import invariance, synthetic_renderer, warp, write_invariance
from convscope.layout import Layout


def test_warp_is_exact_on_the_pixel_grid():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(warp(x, rotation=90), torch.rot90(x, 1, (-2, -1)), atol=1e-6, rtol=0)
    y = warp(x, dy=3, fill=0.5)  # down by 3: the top 3 rows are exposed
    torch.testing.assert_close(y[..., 3:, :], x[..., :-3, :], atol=1e-6, rtol=0)
    assert torch.all(y[..., :3, :] == 0.5)
    y = warp(x, dx=-2, fill=torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(y[..., :-2], x[..., 2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(y[0, :, 0, -2:], torch.tensor([[0.1] * 2, [0.2] * 2, [0.3] * 2]))
    wide = torch.rand(1, 3, 6, 10)
    torch.testing.assert_close(warp(wide, rotation=180), wide.flip(-1, -2), atol=1e-6, rtol=0)
    torch.testing.assert_close(warp(x, scale=1.0, rotation=360), x, atol=1e-5, rtol=0)
    # scale 2 about the centre of a 4x4 image: output pixel centres 1.5 +- 0.25, 0.75 map to input 1.25..2.25
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    torch.testing.assert_close(warp(ramp, scale=2.0)[0, 0, 0], torch.tensor([0.75, 1.25, 1.75, 2.25]))


class PixelNet(nn.Module):
    """Layer ``pixels`` is the image itself; the logits are a fixed linear map of it."""

    def __init__(self):
        super().__init__()
        self.pixels = nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
        torch.manual_seed(0)
        with torch.no_grad():
            self.head[1].weight.mul_(10)

    def forward(self, x):
        return self.head(self.pixels(x))


def test_distances_and_probabilities_by_hand():
    model = PixelNet().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    r = invariance(model, x, labels, layers=["pixels"], translations=[-2, 0, 1], scales=[1.0, 1.5],
                   rotations=[0, 90], fill=0.5)
    assert r.mode == "warp" and list(r.curves) == ["translation", "scale", "rotation"]
    for name, values, kw in (("translation", [-2, 0, 1], "dy"), ("scale", [1.0, 1.5], "scale"),
                             ("rotation", [0, 90], "rotation")):
        c = r.curves[name]
        assert c.values.tolist() == values
        for t, v in enumerate(values):
            moved = warp(x, fill=0.5, **{kw: v})
            raw = (moved - x).flatten(1).norm(dim=1)
            torch.testing.assert_close(c.raw_distance["pixels"][:, t], raw, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c.distance["pixels"][:, t], raw / x.flatten(1).norm(dim=1), atol=1e-6,
                                       rtol=1e-5)
            p = model(moved).softmax(-1)[torch.arange(2), labels]
            torch.testing.assert_close(c.prob[:, t], p, atol=1e-6, rtol=1e-5)
    assert r.curves["translation"].distance["pixels"][:, 1].abs().max() < 1e-6
    torch.testing.assert_close(r.curves["rotation"].examples[1], torch.rot90(x[1], 1, (-2, -1)), atol=1e-6, rtol=0)


def test_render_mode_uses_the_renderer():
    model = PixelNet().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = []

    def render(i, dx, dy, scale, rotation):
        calls.append((i, dx, dy, scale, rotation))
        return torch.roll(x[i], int(dy), dims=-2)

    r = invariance(model, x, [1, 1], layers=["pixels"], translations=[3], scales=[1.2], rotations=[30],
                   render=render)
    assert r.mode == "render"
    assert calls == [(0, 0.0, 3.0, 1.0, 0.0), (1, 0.0, 3.0, 1.0, 0.0), (0, 0.0, 0.0, 1.2, 0.0),
                     (1, 0.0, 0.0, 1.2, 0.0), (0, 0.0, 0.0, 1.0, 30.0), (1, 0.0, 0.0, 1.0, 30.0)]
    expected = (torch.roll(x, 3, dims=-2) - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(r.curves["translation"].raw_distance["pixels"][:, 0], expected)
    assert r.curves["scale"].raw_distance["pixels"].abs().max() == 0


def test_synthetic_renderer_identity_is_the_data():
    data = load_synthetic("test", n=3)
    render = synthetic_renderer("test", [2, 0])
    assert torch.equal(render(0, 0, 0, 1, 0), data[2][0]) and torch.equal(render(1, 0, 0, 1, 0), data[0][0])
    assert not torch.equal(render(0, 0, 4, 1, 0), data[2][0])


def test_write_invariance(tmp_path):
    model = PixelNet().eval()
    x = torch.rand(3, 3, 8, 8)
    r = invariance(model, x, [0, 1, 2], layers=["pixels", "head"], translations=[0, 2], scales=[1, 1.5],
                   rotations=[0, 45])
    r.classes = ["a", "b", "c"]
    png, js = write_invariance(r, Layout(tmp_path), "fig5")
    assert png == tmp_path / "figures" / "fig5.png" and js == tmp_path / "figures" / "fig5.json"
    assert Image.open(png).size[0] > 500
    data = json.loads(js.read_text())
    assert data["labels"] == ["a", "b", "c"] and data["layers"] == ["pixels", "head"]
    assert data["curves"]["scale"]["prob"][2] == pytest.approx(r.curves["scale"].prob[2].tolist())


def test_bad_input():
    model, x = PixelNet().eval(), torch.rand(2, 3, 8, 8)
    with pytest.raises(ConvscopeError, match="2 images but 3 labels"):
        invariance(model, x, [0, 1, 2], layers=["pixels"])
    with pytest.raises(ConvscopeError, match="scales must be positive"):
        invariance(model, x, [0, 1], layers=["pixels"], scales=[1, 0])
    with pytest.raises(ConvscopeError, match="valid layers: pixels"):
        invariance(model, x, [0, 1])  # PixelNet has no conv1 / fc7
    with pytest.raises(ConvscopeError, match="translations must be a non-empty"):
        invariance(model, x, [0, 1], layers=["pixels"], translations=[])


@pytest.mark.slow
def test_trained_net_layer1_moves_more_than_layer7_and_keeps_the_true_class(trained_zf, untrained_zf, measured):
    """Fig. 5: small translations change layer 1 a lot and layer 7 less (relative distances), and the output keeps
    the true class (the paper's third column). The first part is the architecture's as much as training's: the
    untrained net's layer 1 moves as much more than its layer 7 (ratio 4.2 against the trained net's 3.9 at seed
    0), so the property that training adds, and the control fails, is the second. Measured over seeds 0-2
    (scripts/seeds.py): conv1 / fc7 ratio 2.3-3.9 on warped images (control 2.7-4.2), 1.06-2.7 on re-rendered
    ones (so asserted on the warped only); mean p(true class) under shifts of up to 4 px 0.84-0.93 warped,
    0.78-0.96 re-rendered (control 0.08)."""
    for prefix, (model, data) in (("", trained_zf), ("control.", untrained_zf)):
        x, y = data.batch(torch.arange(5))
        for mode, render in (("warp", None), ("render", synthetic_renderer("test", range(5)))):
            r = invariance(model, x, y, translations=[-4, -2, 2, 4], scales=[1.0], rotations=[0], render=render)
            curve = r.curves["translation"]
            ratio = float(curve.distance["conv1"].mean() / curve.distance["fc7"].mean())
            p_true = float(curve.prob.mean())
            measured(f"{prefix}fig5.{mode}.conv1_over_fc7", ratio)
            measured(f"{prefix}fig5.{mode}.p_true", p_true)
            assert mode == "render" or ratio > 1.5  # the architecture's as much as training's: asserted of both
            if prefix:
                assert not p_true > 0.5
            else:
                assert p_true > 0.5
