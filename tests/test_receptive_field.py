"""receptive_field: a unit's input box (paper Fig. 2's patches) equals the support of its gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.receptive_field import Box, receptive_field


def positive_copy(model: nn.Module) -> nn.Module:
    """Same geometry, no cancellation: positive conv weights, average instead of max pools (a max pool's
    gradient reaches only its switch, not its whole window), contrast norm (pointwise in space) dropped."""
    m = copy.deepcopy(model).eval()
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(
                    parent,
                    name,
                    nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode),
                )
            elif isinstance(child, nn.LocalResponseNorm):
                setattr(parent, name, nn.Identity())
    with torch.no_grad():
        for c in m.modules():
            if isinstance(c, nn.Conv2d):
                c.weight.fill_(1.0 / c.weight[0].numel())
                if c.bias is not None:
                    c.bias.zero_()
    return m


def gradient_support(m: nn.Module, layer: str, position, size: int) -> tuple[int, int, int, int]:
    """Bounding box of the nonzero input gradient of unit ``position`` of channel 0 (m: a positive copy)."""
    _, module = cs.resolve_layer(m, layer)
    seen = []
    handle = module.register_forward_hook(lambda mod, i, o: seen.append(o))
    x = (torch.rand(1, 3, size, size) + 1).requires_grad_(True)
    m(x)
    handle.remove()
    (g,) = torch.autograd.grad(seen[0][0, 0, position[0], position[1]], x)
    nz = g[0].abs().sum(0).nonzero()
    return (int(nz[:, 0].min()), int(nz[:, 1].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].max()) + 1)


@pytest.mark.parametrize("name", ["zfnet", "zfnet_small"])
def test_equals_gradient_support(name):
    torch.manual_seed(0)
    model = cs.create_model(name)
    cases = {
        "zfnet": [("conv1", (0, 0)), ("conv1", (54, 109)), ("conv2", (12, 3)), ("conv3", (6, 6)),
                  ("conv5", (0, 12)), ("features.pool5", (5, 2)), ("features.pool1", (54, 54))],
        "zfnet_small": [("conv1", (31, 0)), ("conv2", (3, 4)), ("conv3", (0, 0)), ("conv3", (3, 3)),
                        ("features.pool2", (3, 1))],
    }[name]  # fmt: skip
    positive = positive_copy(model.features)  # the convolutional part is all a conv unit depends on
    for layer, pos in cases:
        module = model.paper_layers.get(layer, layer).removeprefix("features.")
        want = gradient_support(positive, module, pos, model.input_size)
        assert tuple(receptive_field(model, layer, pos)) == want


def test_known_numbers_and_many_positions():
    model = cs.create_model("zfnet")
    # conv1 7x7 stride 2 padding 1: unit (0, 0) sees rows -1..5 -> 0..5; unit (3, 4) rows 5..11, cols 7..13
    assert receptive_field(model, "conv1", (0, 0)) == Box(0, 0, 6, 6)
    assert receptive_field(model, "features.conv1", (3, 4)) == Box(5, 7, 12, 14)
    boxes = receptive_field(model, "conv1", [(0, 0), (3, 4)])
    assert boxes == [Box(0, 0, 6, 6), Box(5, 7, 12, 14)]
    assert receptive_field(model, "fc6", None) == Box(0, 0, 224, 224)
    image = torch.arange(224 * 224).view(224, 224)
    ys, xs = boxes[1].slices
    assert image[ys, xs].shape == (7, 7) and image[ys, xs][0, 0] == 5 * 224 + 7


class Branchy(nn.Module):
    """Residual add, a strided downsample branch in parallel, "same" padding, dilation, F.pad."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.down = nn.Conv2d(4, 4, 1, stride=2)
        self.c = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = self.b(h) + self.down(h)
        return self.c(nn.functional.pad(h, (1, 1, 1, 1)))


def test_non_sequential_net_equals_gradient_support():
    net = Branchy()
    positive = positive_copy(net)
    for pos in [(0, 0), (5, 9), (15, 15)]:
        assert tuple(receptive_field(net, "c", pos, input_size=32)) == gradient_support(
            positive, "c", pos, 32
        )


def test_bad_input():
    model = cs.create_model("zfnet_small")
    with pytest.raises(cs.ConvscopeError, match="out of range"):
        receptive_field(model, "conv5", (4, 0))
    with pytest.raises(cs.ConvscopeError, match="no spatial positions"):
        receptive_field(model, "fc6", (0, 0))
    with pytest.raises(cs.ConvscopeError, match="valid layers"):
        receptive_field(model, "conv7", (0, 0))
    with pytest.raises(cs.ConvscopeError, match="input_size"):
        receptive_field(Branchy(), "c", (0, 0))
