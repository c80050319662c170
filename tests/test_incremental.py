"""Incremental occlusion (Krypton): the same numbers as the dense passes and as Captum's Occlusion on zfnet at
224 px, zfnet_small at 64 px, a residual net and a net of odd poolings, at the border and the centre, over
square sizes and strides; the fallback to dense where it cannot be exact, and why; the self-check; the
approximate mode's error and its saving."""

from __future__ import annotations

import json
import warnings

import captum.attr as captum_attr
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import convscope as cs
from convscope import incremental
from convscope.errors import ConvscopeError
from convscope.forward import eval_mode, on_device
from convscope.layers import site
from convscope.layout import Layout
from convscope.occluders import occluded_passes, square_positions
from convscope.occlusion import OcclusionResults, occlusion, write_occlusion
from convscope.usermodel import add_normalization

FILL = torch.tensor([0.3, 0.5, 0.7])


def _attach_models() -> dict:
    """tests/test_attach.py's user model file (a ResNet block: batch norm, a residual add, a ReLU module called
    twice, in place), its classes."""
    from helpers import MODEL_PY

    namespace: dict = {}
    exec(compile(MODEL_PY, "model.py", "exec"), namespace)
    return namespace


TinyResNet = _attach_models()["TinyResNet"]


class PoolNet(nn.Module):
    """At 32 px: overlapping 3/2 max pooling in ceil mode, a strided conv, an average pool with padding, a grouped
    dilated conv with "same" padding, a product of two maps, a padded max pool and a ceil-mode average pool whose
    last window has a smaller divisor (not exact as a box: materialised there)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(8, 12, 5, stride=2, padding=2)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.conv3 = nn.Conv2d(12, 12, 3, padding="same", dilation=2, groups=3)
        self.pool2 = nn.MaxPool2d(2, padding=1)
        self.pool3 = nn.AvgPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(12 * 9, 6)

    def forward(self, x):
        x = self.pool1(self.act(self.conv1(x)))
        x = self.avg(F.relu(self.conv2(x)))
        x = self.conv3(x)
        x = x * torch.sigmoid(x)
        return self.fc(self.pool3(self.pool2(x)).flatten(1))


def seeded(model: nn.Module, seed: int = 0, logits: float = 1.0) -> nn.Module:
    """Random weights and batch-norm statistics (so that batch norm does something), the last layer scaled by
    ``logits`` (probabilities that move, not saturate), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (2 / max(1, p[0].numel())) ** 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if hasattr(model, "fc"):
            model.fc.weight.mul_(logits)
    return model.eval()


def zfnet_small(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """An untrained zfnet_small whose probabilities move by tenths under the square (fc8 scaled up), and an image."""
    torch.manual_seed(seed)
    model = cs.create_model("zfnet_small", 6).eval()
    with torch.no_grad():
        model.classifier.fc8.weight.mul_(30)
    return model, torch.rand(3, 64, 64)


def passes(model, image, layer, size, stride, method, approx=False, batch=16):
    """Per-map totals of ``layer`` and probabilities at every position, the method used and why."""
    corners = square_positions(*image.shape[-2:], size, stride).flatten(0, 1)
    with eval_mode(model), torch.inference_mode():
        fn, used, note = occluded_passes(model, image, site(model, layer), corners, size, FILL, method, approx)
        out = [fn(corners[i:i + batch]) for i in range(0, len(corners), batch)]
    return torch.cat([t for t, _ in out]), torch.cat([p for _, p in out]), used, note


def assert_rel(got, want, rtol=1e-4):
    """Equal to ``rtol`` of the largest value (float32 rounding: windows summed in another order)."""
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= rtol * scale, f"error {err:.3g} against largest value {scale:.3g}"


def captum_drop(model, image, label, size):
    """Captum's Occlusion with squares that tile the image: per pixel, p(clean) - p(occluded there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return captum_attr.Occlusion(lambda x: model(x).softmax(-1)[:, label]).attribute(
            image[None], sliding_window_shapes=(3, size, size), strides=(3, size, size),
            baselines=FILL.view(1, 3, 1, 1).expand(1, 3, *image.shape[-2:]))[0, 0]


def check_against_captum(model, image, probs, size):
    """``probs`` (positions, classes) of tiling squares of ``size`` give Captum's attribution of the top class."""
    with torch.no_grad():
        clean = model(image[None]).softmax(-1)[0]
    label = int(clean.argmax())
    rows, cols = image.shape[-2] // size, image.shape[-1] // size
    drop = (clean[label] - probs[:, label]).view(rows, cols)
    expected = drop.repeat_interleave(size, 0).repeat_interleave(size, 1)
    attr = captum_drop(model, image, label, size)[: rows * size, : cols * size]
    assert expected.abs().max() > 1e-4  # occluding matters, or the comparison would prove nothing
    assert_rel(attr, expected)


def test_zfnet_224_equals_dense_and_captum():
    """The paper's net at its size: 3 x 3 squares of 74 px (corners, edges, centre) tile the image."""
    torch.manual_seed(0)
    model = cs.create_model("zfnet", 1000, init="he").eval()
    image = torch.rand(3, 224, 224)
    t_inc, p_inc, used, _ = passes(model, image, "conv5", 74, 74, "incremental", batch=9)
    t_dense, p_dense, _, _ = passes(model, image, "conv5", 74, 74, "dense", batch=9)
    assert used == "incremental"
    assert_rel(t_inc, t_dense)
    assert_rel(p_inc, p_dense)
    check_against_captum(model, image, p_inc, 74)


def test_zfnet_small_occlusion_result_and_json(tmp_path):
    """The public API: every panel the same incrementally as densely; the method written into fig7.json."""
    model, image = zfnet_small(1)
    fast = occlusion(model, image, 2, size=12, stride=4, fill=FILL, batch_size=50)
    slow = occlusion(model, image, 2, size=12, stride=4, fill=FILL, batch_size=50, method="dense")
    assert (fast.method, slow.method) == ("incremental", "dense")
    assert "checked against the model's forward pass" in fast.method_note
    assert fast.channel == slow.channel
    assert_rel(fast.activation, slow.activation)
    assert_rel(fast.prob, slow.prob)
    assert torch.equal(fast.top_class, slow.top_class)
    check_against_captum(model, image, passes(model, image, "conv5", 16, 16, "incremental")[1], 16)
    _, js = write_occlusion(OcclusionResults([fast], [str(c) for c in range(6)], ["true"]), Layout(tmp_path))
    data = json.loads(js.read_text())["images"][0]
    assert data["method"] == "incremental" and data["method_note"] == fast.method_note


@pytest.mark.parametrize(("layer", "hooks"), [("layer2", False), ("layer1.relu#2", True)])
def test_residual_net(layer, hooks):
    """Batch norm, residual adds (union of boxes), a ReLU module called twice in place, a 1x1 strided shortcut,
    a probed block output and a probed second call; an attached model's input hooks."""
    model = seeded(TinyResNet(num_classes=5), logits=0.1)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    if hooks:  # what attach and --device add: the engine runs them on the image and the patch itself
        add_normalization(model, [0.5, 0.45, 0.4], [0.25, 0.25, 0.25])
        on_device(model, torch.device("cpu"))
    t_inc, p_inc, used, _ = passes(model, image, layer, 8, 5, "incremental")
    t_dense, p_dense, _, _ = passes(model, image, layer, 8, 5, "dense")
    assert used == "incremental"
    assert_rel(t_inc, t_dense)
    assert_rel(p_inc, p_dense)
    if not hooks:
        check_against_captum(model, image, passes(model, image, layer, 8, 8, "incremental")[1], 8)


@pytest.mark.parametrize(("size", "stride"), [(4, 4), (5, 3), (9, 7), (1, 5), (16, 6), (32, 1)])
def test_odd_pooling_over_sizes_and_strides(size, stride):
    """Border and centre squares, strides below and above the size, a one-pixel square (a stride can skip it)
    and one covering the whole image."""
    model, image = seeded(PoolNet(), 1), torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
    for layer in ("pool1", "conv3", "pool3"):
        t_inc, p_inc, used, _ = passes(model, image, layer, size, stride, "incremental")
        t_dense, p_dense, _, _ = passes(model, image, layer, size, stride, "dense")
        assert used == "incremental"
        assert_rel(t_inc, t_dense)
        assert_rel(p_inc, p_dense)
    if size == 4:
        check_against_captum(model, image, p_inc, 4)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(side=st.integers(9, 20), k=st.integers(1, 5), s=st.integers(1, 3), d=st.integers(1, 2),
       pk=st.integers(1, 3), ps=st.integers(1, 3), ceil=st.booleans(), avg=st.booleans(), size=st.integers(1, 8),
       stride=st.integers(1, 6))
def test_any_window_geometry(side, k, s, d, pk, ps, ceil, avg, size, stride):
    """A convolution and a pooling of any kernel, stride, dilation, padding and ceil mode (an average pool whose
    ceil-mode windows change divisor is materialised): the same as the dense passes."""
    conv_side = (side + 2 * (k // 2) - d * (k - 1) - 1) // s + 1
    assume(conv_side >= pk and size <= side)
    pool = (nn.AvgPool2d(pk, ps, pk // 2, ceil_mode=ceil) if avg
            else nn.MaxPool2d(pk, ps, pk // 2, ceil_mode=ceil))
    model = seeded(nn.Sequential(nn.Conv2d(3, 4, k, s, k // 2, dilation=d), nn.ReLU(), pool, nn.Flatten()), 5)
    image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(side))
    t_inc, p_inc, used, _ = passes(model, image, "2", size, stride, "incremental")
    t_dense, p_dense, _, _ = passes(model, image, "2", size, stride, "dense")
    assert used == "incremental"
    assert_rel(t_inc, t_dense)
    assert_rel(p_inc, p_dense)


class Branchy(nn.Module):
    """A forward pass that branches on the data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            x = x.relu()
        return self.fc(x.mean((-2, -1)))


class InPlace(nn.Module):
    """An in-place ReLU on a map that is read again after it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        z = y.relu_()
        return self.fc((z + y).mean((-2, -1)))


def hooked() -> nn.Module:
    model = seeded(PoolNet())
    model.conv2.register_forward_hook(lambda m, i, o: o * 2)
    return model


@pytest.mark.parametrize(("make", "reason"), [
    (Branchy, "torch.fx cannot trace the model"),
    (InPlace, "writes in place into conv"),
    (hooked, "'conv2' has forward hooks"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), "no convolution or pooling"),
])
def test_falls_back_to_dense_and_says_why(make, reason):
    model = make().eval()
    image = torch.rand(3, 32, 32) if isinstance(model, PoolNet) else torch.rand(3, 8, 8)
    layer = "fc" if hasattr(model, "fc") else "1"
    t_auto, p_auto, used, note = passes(model, image, layer, 3, 2, "auto")
    assert used == "dense" and note.startswith("dense: ") and reason in note
    t_dense, p_dense, _, _ = passes(model, image, layer, 3, 2, "dense")
    assert torch.equal(t_auto, t_dense) and torch.equal(p_auto, p_dense)
    with pytest.raises(ConvscopeError, match="cannot run incrementally"):
        passes(model, image, layer, 3, 2, "incremental")


def test_self_check_catches_a_wrong_rule(monkeypatch):
    """A rule that computed the wrong thing would be caught by the check against the model's own pass."""
    monkeypatch.setattr(incremental._Pointwise, "__call__", lambda self, box, tau: incremental._Box(
        self.fn(box.patch) + 1, box.y, box.x))
    model, image = seeded(PoolNet()), torch.rand(3, 32, 32)
    _, _, used, note = passes(model, image, "conv3", 8, 8, "auto")
    assert used == "dense" and "differs from the model's forward pass" in note


def test_bad_method():
    model, image = seeded(PoolNet()), torch.rand(3, 32, 32)
    with pytest.raises(ConvscopeError, match="unknown occlusion method 'fast'"):
        passes(model, image, "conv3", 8, 8, "fast")
    with pytest.raises(ConvscopeError, match="approx truncates"):
        passes(model, image, "conv3", 8, 8, "dense", approx=True)


def test_approximate_mode_error_and_saving():
    """Krypton's projective-field threshold on zfnet_small at 64 px: fewer multiply-adds than the exact engine,
    an error that is there but bounded."""
    model, image = zfnet_small(2)
    probe = site(model, "conv5")
    corners = square_positions(64, 64, 12, 4).flatten(0, 1)
    patch = FILL.view(3, 1, 1).expand(3, 12, 12)
    with torch.inference_mode():
        engine, _ = incremental.engine(model, image, probe, patch, corners)
        exact_t, exact_out = engine(corners, patch)
        exact_macs, engine.macs = engine.macs, 0
        approx_t, approx_out = engine(corners, patch, tau=incremental.TAU)
    # Measured: the exact engine 0.43 of the dense multiply-adds, the approximate one 0.43 of the exact's.
    assert exact_macs < 0.6 * engine.dense_macs * len(corners)
    assert engine.macs < 0.6 * exact_macs
    # Measured: conv5 totals within 3.2 % of the largest, probabilities within 4.8 % of the largest.
    t_err = float((approx_t - exact_t).abs().max() / exact_t.abs().max())
    p_exact, p_approx = exact_out.softmax(-1), approx_out.softmax(-1)
    p_err = float((p_approx - p_exact).abs().max() / p_exact.max())
    assert torch.isfinite(approx_t).all() and torch.isfinite(approx_out).all()
    assert 1e-4 < t_err < 0.1 and 1e-4 < p_err < 0.15
