"""The projection engine (paper section 2.1): hand-computed cases, an explicit unpool-rectify-filter chain,
Captum as an oracle, functional and in-place ReLUs, hygiene after every call, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import activation, captum, close
from torch import nn

import convscope as cs
from convscope.deconvnet import RULES, Projector

# ---------------------------------------------------------------- hand-computed cases


def tiny_pool_net() -> nn.Sequential:
    conv = nn.Conv2d(1, 1, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, -1.0], [0.0, 1.0]]]]))
        conv.bias.fill_(-1.0)  # shifts the forward; must not appear in any backward
    return nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2, stride=1))


TINY_X = torch.tensor([[1.0, 2, 0, 1], [0, 1, 3, 0], [2, 0, 1, 1], [1, 1, 0, 2]]).view(1, 1, 4, 4)
# By hand: conv y = [[-1, 4, -2], [-2, -2, 3], [2, -2, 1]], relu r = [[0, 4, 0], [0, 0, 3], [2, 0, 1]],
# overlapping 2x2 stride-1 pool p = [[4, 4], [2, 3]] with switches (0,1), (0,1), (2,0), (1,2): location (0,1)
# is the switch of two windows, so unpooling must add there. The transposed filter sends r-gradient g at (i,j)
# to x at (i,j) * 1, (i,j+1) * -1, (i+1,j+1) * 1.


@pytest.mark.parametrize("rule", RULES)
def test_hand_computed_whole_map(rule):
    # seed = p itself; unpool: (0,1) gets 4 + 4 = 8, (2,0) gets 2, (1,2) gets 3; all on positive units.
    out = Projector(tiny_pool_net(), rule).project(TINY_X, "2", channel=0, mode="map")
    want = torch.tensor([[0.0, 8, -8, 0], [0, 0, 11, -3], [2, -2, 0, 3], [0, 2, 0, 0]])
    assert torch.allclose(out[0, 0], want)


def test_hand_computed_strongest_and_position():
    proj = Projector(tiny_pool_net())
    # strongest activation: 4 at (0,0) (first of two), seeded with 4, switch (0,1)
    want = torch.tensor([[0.0, 4, -4, 0], [0, 0, 4, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.allclose(proj.project(TINY_X, "2", channel=0)[0, 0], want)
    # position (1,1): value 3, switch (1,2)
    want = torch.tensor([[0.0, 0, 0, 0], [0, 0, 3, -3], [0, 0, 0, 3], [0, 0, 0, 0]])
    assert torch.allclose(proj.project(TINY_X, "2", channel=0, position=(1, 1))[0, 0], want)


@pytest.mark.parametrize(
    "rule, want",
    [
        # relu-gradient at the switches: (0,1): 1 - 2 = -1, (2,0): 3, (1,2): 1; deconvnet, guided drop the -1
        ("deconvnet", [[0.0, 0, 0, 0], [0, 0, 1, -1], [3, -3, 0, 1], [0, 3, 0, 0]]),
        ("guided", [[0.0, 0, 0, 0], [0, 0, 1, -1], [3, -3, 0, 1], [0, 3, 0, 0]]),
        ("gradient", [[0.0, -1, 1, 0], [0, 0, 0, -1], [3, -3, 0, 1], [0, 3, 0, 0]]),
    ],
)
def test_hand_computed_grad_output(rule, want):
    cot = torch.tensor([[1.0, -2], [3, 1]]).view(1, 1, 2, 2)
    out = Projector(tiny_pool_net(), rule).project(TINY_X, "2", grad_output=cot)
    assert torch.allclose(out[0, 0], torch.tensor(want))


@pytest.mark.parametrize(
    "rule, want", [("deconvnet", [0.0, 2, 0]), ("guided", [0.0, 0, 0]), ("gradient", [-2.0, 0, -2])]
)
def test_hand_computed_rules_differ_at_the_relu(rule, want):
    # x = [1, -2, 3] -> *2 -> relu [2, 0, 6] -> *-1; cotangent [1, -1, 1] gives relu-gradient [-1, 1, -1].
    # deconvnet keeps the positive 1 where the forward was off; guided masks it; gradient keeps the negatives.
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.Conv2d(1, 1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[2].weight.fill_(-1.0)
    x = torch.tensor([1.0, -2, 3]).view(1, 1, 1, 3)
    out = Projector(net, rule).project(x, "2", grad_output=torch.tensor([1.0, -1, 1]).view(1, 1, 1, 3))
    assert torch.equal(out.flatten(), torch.tensor(want))


# ---------------------------------------------------------------- explicit chain (section 2.1 as written)


def chain_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(16, 12, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


def explicit_deconvnet(net: nn.Sequential, x: torch.Tensor, seed_fn) -> torch.Tensor:
    """Unpool (scatter-ADD at the switches) -> rectify -> transposed filters, layer by layer, no autograd."""
    saved, h = [], x
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.MaxPool2d):
                out, idx = F.max_pool2d(
                    h, m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode, return_indices=True
                )
                saved.append(("pool", idx, h.shape))
            else:
                out = m(h)
                saved.append(("conv", m, h.shape) if isinstance(m, nn.Conv2d) else ("relu", None, None))
            h = out
        g = seed_fn(h)
        for kind, what, shape in reversed(saved):
            if kind == "pool":
                g = torch.zeros(shape).flatten(2).scatter_add_(2, what.flatten(2), g.flatten(2)).view(shape)
            elif kind == "relu":
                g = g.clamp(min=0)
            else:
                size = g.shape[-1]
                pad = shape[-1] - ((size - 1) * what.stride[0] - 2 * what.padding[0] + what.kernel_size[0])
                g = F.conv_transpose2d(g, what.weight, None, what.stride, what.padding, output_padding=pad)
    return g


def test_equals_explicit_unpool_rectify_filter_chain():
    net, x = chain_net(), torch.randn(3, 3, 37, 37)
    act = activation(net, "7", x)
    chans = torch.tensor([0, 5, 11])

    def strongest(h):
        seed = torch.zeros_like(h)
        for i, c in enumerate(chans):
            flat = h[i, c].flatten()
            seed[i, c].view(-1)[flat.argmax()] = flat.max()
        return seed

    assert act[torch.arange(3), chans].flatten(1).max(1).values.min() > 0
    want = explicit_deconvnet(net, x, strongest)
    got = Projector(net).project(x, "7", channel=chans)
    assert close(got, want)
    # the whole map, seeded with itself
    want = explicit_deconvnet(net, x, lambda h: h * (torch.arange(12) == 5).view(1, -1, 1, 1))
    assert close(Projector(net).project(x, "7", channel=5, mode="map"), want)


def test_overlapping_pool_backward_adds_at_repeated_switches():
    # A single bright pixel is the switch of all 4 overlapping 3x3/2 windows covering it.
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    net = nn.Sequential(nn.MaxPool2d(3, 2))
    out = Projector(net, "gradient").project(x, "0", grad_output=torch.ones(1, 1, 2, 2))
    assert out[0, 0, 2, 2].item() == 4.0 and out.sum().item() == 4.0


# ---------------------------------------------------------------- Captum as the oracle


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return cs.create_model("zfnet_small", num_classes=10).eval(), torch.rand(2, 3, 64, 64)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layer, neuron", [("conv5", (3, 1, 2)), ("conv2", (7, 5, 6)), ("fc6", 5)])
def test_equals_captum_zfnet_small(small, rule, layer, neuron):
    model, x = small
    act = activation(model, layer, x)
    neuron = int(act[0].argmax()) if isinstance(neuron, int) else neuron  # a live fc unit
    want = captum(model, layer, x, rule, neuron)
    kw = {"channel": neuron} if isinstance(neuron, int) else {"channel": neuron[0], "position": neuron[1:]}
    assert close(Projector(model, rule).project(x, layer, **kw), want)


@pytest.mark.slow  # about 1 s quiet, several seconds on a loaded 2-core machine
@pytest.mark.parametrize("rule", RULES)
def test_equals_captum_zfnet_224(rule):
    torch.manual_seed(0)
    model = cs.create_model("zfnet", init="he").eval()  # He init: N(0, 0.01) vanishes before conv5
    x = torch.rand(1, 3, 224, 224)
    act = activation(model, "conv5", x)[0]
    c, r, col = torch.unravel_index(act.argmax(), act.shape)
    neuron = (int(c), int(r), int(col))
    want = captum(model, "conv5", x, rule, neuron)
    assert close(Projector(model, rule).project(x, "conv5", channel=neuron[0], position=neuron[1:]), want)
    if rule == "deconvnet":  # the default seed is this very activation, the strongest of its map
        assert close(Projector(model, rule).project(x, "conv5", channel=neuron[0]), want)


class Block(nn.Module):
    def __init__(self, c: int, functional: bool, inplace: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.functional = functional
        self.relu1, self.relu2 = nn.ReLU(inplace), nn.ReLU(inplace)

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        h = F.relu(h) if self.functional else self.relu1(h)
        h = self.bn2(self.conv2(h)) + x
        return h.relu_() if self.functional else self.relu2(h)


class ResNet(nn.Module):
    def __init__(self, functional: bool = False, inplace: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.block1, self.block2 = Block(8, functional, inplace), Block(8, functional, inplace)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.functional = functional
        self.relu_out = nn.ReLU(inplace)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(), nn.Linear(16, 4))

    def forward(self, x):
        h = torch.relu(self.stem(x)) if self.functional else self.relu(self.stem(x))
        h = self.block2(self.block1(self.pool(h)))
        h = self.down(h)
        return self.head(h.relu() if self.functional else self.relu_out(h))


def resnet(functional=False, inplace=False) -> ResNet:
    torch.manual_seed(3)
    net = ResNet(functional, inplace)
    for m in net.modules():  # non-trivial eval statistics, so that batch norm is a real affine map
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layer", ["block2.relu2", "relu_out"])
def test_equals_captum_residual_net(rule, layer):
    net, x = resnet(), torch.rand(2, 3, 32, 32)
    act = activation(net, layer, x)[0]
    c, r, col = (int(v) for v in torch.unravel_index(act.argmax(), act.shape))
    want = captum(net, layer, x, rule, (c, r, col))
    assert close(Projector(net, rule).project(x, layer, channel=c, position=(r, col)), want)


@pytest.mark.parametrize("rule", RULES)
def test_inplace_and_functional_relus_equal_module_relus(rule):
    x = torch.rand(2, 3, 32, 32)
    nets = [resnet(), resnet(inplace=True), resnet(functional=True)]
    outs = [Projector(n, rule).project(x, "block2", channel=torch.tensor([1, 6])) for n in nets]
    assert outs[0].abs().max() > 0
    assert close(outs[1], outs[0]) and close(outs[2], outs[0])
    # and Captum agrees on the in-place model (its ReLUs are modules)
    act = activation(nets[1], "block2", x)[0]
    c, r, col = (int(v) for v in torch.unravel_index(act.argmax(), act.shape))
    want = captum(nets[1], "block2", x, rule, (c, r, col))
    assert close(Projector(nets[1], rule).project(x, "block2", channel=c, position=(r, col)), want)


def test_vgg_style_inplace_relus_equal_captum():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    ).eval()  # fmt: skip
    x = torch.rand(1, 3, 16, 16)
    act = activation(net, "4", x)[0]
    c, r, col = (int(v) for v in torch.unravel_index(act.argmax(), act.shape))
    want = captum(net, "4", x, "deconvnet", (c, r, col))
    assert close(Projector(net).project(x, "4", channel=c, position=(r, col)), want)


# ---------------------------------------------------------------- seeding, batching, many channels


def test_batch_rows_are_independent(small):
    model, x = small
    proj = Projector(model, "guided")
    both = proj.project(x, "conv4", channel=torch.tensor([9, 30]))
    assert torch.allclose(proj.project(x[1:], "conv4", channel=30)[0], both[1], atol=1e-7, rtol=1e-5)
    assert torch.allclose(proj.project(x[:1], "conv4", channel=9)[0], both[0], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_project_at_seeds_each_image_at_its_own_unit_and_returns_its_value(small, rule):
    """One forward and backward for a batch where image i is seeded at (channel i, position i): the same
    projections as one call per image, and the seeded activations' values."""
    model, x = small
    proj = Projector(model, rule)
    channels, positions = torch.tensor([9, 30]), torch.tensor([[1, 2], [3, 0]])
    got, values = proj.project_at(x, "conv4", channels, positions)
    act = activation(model, "conv4", x)
    for i in range(2):
        one = proj.project(x[i:i + 1], "conv4", channel=int(channels[i]), position=tuple(positions[i].tolist()))
        assert close(got[i:i + 1], one)
        # float32 rounding is relative to the layer's scale, not to one unit's value (a sum of terms of both signs)
        assert values[i].item() == pytest.approx(act[i, channels[i], positions[i, 0], positions[i, 1]].item(),
                                                 rel=1e-5, abs=1e-6 * act.abs().max().item())
    with pytest.raises(cs.ConvscopeError, match="one channel and one \\(row, col\\) per activation"):
        proj.project_at(x, "conv4", channels[:1], positions)
    with pytest.raises(cs.ConvscopeError, match="position is out of range: the layer's maps are 4x4"):
        proj.project_at(x, "conv4", channels, torch.tensor([[4, 0], [0, 0]]))
    with pytest.raises(cs.ConvscopeError, match="has no feature maps"):
        proj.project_at(x, "fc6", channels, positions)


@pytest.mark.parametrize("rule", RULES)
def test_activations_of_one_image_share_its_forward_pass(small, rule):
    """Five activations of two images (three of the first, two of the second, one of them twice): one forward
    pass of the two images, three backward passes (the most an image holds), and each projection the one a call
    of its own gives."""
    model, x = small
    proj = Projector(model, rule)
    owners = torch.tensor([0, 1, 0, 0, 1])
    channels = torch.tensor([9, 30, 9, 2, 30])
    positions = torch.tensor([[1, 2], [3, 0], [0, 0], [1, 2], [3, 0]])
    batches = []
    hook = model.features.conv1.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        got, values = proj.project_at(x, "conv4", channels, positions, owners)
    finally:
        hook.remove()
    assert batches == [2] and got.shape == (5, *x.shape[1:])
    for i in range(5):
        one, value = proj.project_at(x[owners[i]][None], "conv4", channels[i:i + 1], positions[i:i + 1])
        assert close(got[i:i + 1], one) and values[i].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7)
    assert close(got[1:2], got[4:5])
    with pytest.raises(cs.ConvscopeError, match="image is out of range: 2 images"):
        proj.project_at(x, "conv4", channels, positions, torch.tensor([0, 1, 2, 0, 1]))


def test_map_mode_is_linear_sum_of_unit_projections(small):
    # gradient rule: the backward is linear in the seed, so the map projection is the sum over its units
    model, x = small
    proj = Projector(model, "gradient")
    act = activation(model, "conv5", x[:1])[0, 4]
    total = sum(proj.project(x[:1], "conv5", channel=4, position=(r, c)) for r in range(4) for c in range(4))
    assert act.sum() > 0
    assert close(proj.project(x[:1], "conv5", channel=4, mode="map"), total)


def test_default_channel_is_the_strongest_map(small):
    model, x = small
    act = activation(model, "conv3", x)
    best = act.flatten(2).amax(2).argmax(1)
    proj = Projector(model)
    assert torch.equal(proj.project(x, "conv3"), proj.project(x, "conv3", channel=best))


def test_project_channels_equals_one_at_a_time(small):
    model, x = small
    proj = Projector(model)
    chans = [0, 5, 17, 63]
    many = proj.project_channels(x[0], "conv5", chans, chunk_size=3)
    one = torch.cat([proj.project(x[:1], "conv5", channel=c) for c in chans])
    assert many.shape == (4, 3, 64, 64) and many.abs().max() > 0
    assert torch.allclose(many, one, atol=1e-7, rtol=1e-5)
    maps = proj.project_channels(x[0], "conv5", torch.tensor([2, 3]), mode="map")
    assert torch.allclose(
        maps[1], proj.project(x[:1], "conv5", channel=3, mode="map")[0], atol=1e-7, rtol=1e-5
    )


def test_works_under_no_grad_and_inference_mode(small):
    model, x = small
    proj = Projector(model)
    want = proj.project(x, "conv2", channel=3)
    with torch.no_grad():
        assert torch.equal(proj.project(x, "conv2", channel=3), want)
    with torch.inference_mode():
        assert torch.equal(proj.project(x, "conv2", channel=3), want)


def test_gradient_rule_equals_autograd_with_any_nonlinearity():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.GELU(), nn.Conv2d(4, 2, 1)
    ).eval()
    x = torch.randn(1, 3, 9, 9, requires_grad=True)
    cot = torch.randn(1, 2, 5, 5)
    (want,) = torch.autograd.grad(net(x), x, cot)
    assert close(Projector(net, "gradient").project(x.detach(), "4", grad_output=cot), want)


class FunctionalLRN(nn.Module):
    def forward(self, x):
        return F.local_response_norm(x, 3, alpha=0.5, beta=0.75, k=1.0)


@pytest.mark.parametrize("norm", [nn.LocalResponseNorm(5, alpha=0.3, beta=0.75, k=2.0), FunctionalLRN()])
def test_contrast_norm_backward_is_its_true_gradient(norm):
    # big alpha, so that the cross-channel terms of the fused backward matter
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 7, 3), nn.ReLU(), norm, nn.Conv2d(7, 4, 3)).eval()
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    cot = torch.randn(2, 4, 5, 5)
    (want,) = torch.autograd.grad(net(x), x, cot)
    assert close(Projector(net, "gradient").project(x.detach(), "3", grad_output=cot), want)


# ---------------------------------------------------------------- errors and hygiene


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x)) * torch.sigmoid(x[:, :1, 1:-1, 1:-1])


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Gated()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_unsupported_nonlinearity_names_the_module(rule):
    net = Outer()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(cs.ConvscopeError, match=r"'block\.act' \(SiLU, which calls silu\).*--nonlinearities gradient"):
        Projector(net, rule).project(x, "head", channel=0)
    # on request, the other nonlinearities pass by their gradient: equal to the gradient rule on this net,
    # which has no ReLU
    passed = Projector(net, rule, nonlinearities="gradient").project(x, "head", channel=0)
    torch.testing.assert_close(passed, Projector(net, "gradient").project(x, "head", channel=0))
    net.block.act = nn.Identity()  # now the functional sigmoid in block's own forward is next
    with pytest.raises(cs.ConvscopeError, match=r"'block' \(Gated, which calls sigmoid\)"):
        Projector(net, rule).project(x, "head", channel=0)
    with pytest.raises(cs.ConvscopeError, match="unknown nonlinearities option 'ignore'"):
        Projector(net, rule, nonlinearities="ignore")


def snapshot(model: nn.Module):
    from torch.nn.modules import module as mod

    hooks = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
        for m in model.modules()
    ]
    globals_ = [
        len(mod._global_forward_hooks),
        len(mod._global_forward_pre_hooks),
        len(mod._global_backward_hooks),
    ]
    return {
        "hooks": hooks,
        "global": globals_,
        "modes": torch._C._len_torch_function_stack(),
        "training": [m.training for m in model.modules()],
        "patched": ["forward" in m.__dict__ for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_enabled": torch.is_grad_enabled(),
    }


def same(a, b) -> bool:
    grads = all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                for x, y in zip(a.pop("grad"), b.pop("grad")))  # fmt: skip
    return grads and a == b


@pytest.mark.parametrize("rule", RULES)
def test_no_trace_left_after_calls_also_failing_ones(rule):
    net = resnet()
    net.add_module("norm", nn.LocalResponseNorm(3))  # patched for the call, must be restored
    net.forward = lambda x, net=net: ResNet.forward(net, net.norm(x))
    net.train()
    net.block1.eval()  # a mixed state must come back as it was
    net.stem.weight.requires_grad_(False)
    net.down.weight.grad = torch.full_like(net.down.weight, 7.0)
    x = torch.rand(2, 3, 32, 32)
    before = snapshot(net)
    proj = Projector(net, rule)
    proj.project(x, "block2", channel=1)
    proj.project_channels(x[0], "down", range(3))
    proj.project(x, "head.3", channel=2)
    with pytest.raises(cs.ConvscopeError):
        proj.project(x, "block2", channel=99)
    with pytest.raises(cs.ConvscopeError):
        proj.project(x, "block2", grad_output=torch.ones(3))
    assert same(snapshot(net), before)
    if rule != "gradient":
        gated = Outer()
        before = snapshot(gated)
        with pytest.raises(cs.ConvscopeError):
            Projector(gated, rule).project(torch.rand(1, 3, 8, 8), "head", channel=0)
        assert same(snapshot(gated), before)


def test_bad_input_raises_clear_errors(small):
    model, x = small
    proj = Projector(model)
    with pytest.raises(cs.ConvscopeError, match="valid rules: deconvnet, guided, gradient"):
        Projector(model, "lrp")
    with pytest.raises(cs.ConvscopeError, match=r"unknown layer 'conv9'.*conv1, conv2.*features\.conv1"):
        proj.project(x, "conv9", channel=0)
    with pytest.raises(cs.ConvscopeError, match="channel 64 out of range.*64 channels"):
        proj.project(x, "conv5", channel=64)
    with pytest.raises(cs.ConvscopeError, match="channel -1 out of range"):
        proj.project(x, "conv5", channel=torch.tensor([0, -1]))
    with pytest.raises(cs.ConvscopeError, match="1-D tensor of 2 channels"):
        proj.project(x, "conv5", channel=torch.tensor([0, 1, 2]))
    with pytest.raises(cs.ConvscopeError, match=r"position \(4, 0\) out of range.*4x4"):
        proj.project(x, "conv5", channel=0, position=(4, 0))
    with pytest.raises(cs.ConvscopeError, match="position is meaningless"):
        proj.project(x, "fc6", channel=0, position=(0, 0))
    with pytest.raises(cs.ConvscopeError, match="4-D"):
        proj.project(x[0], "conv5", channel=0)
    with pytest.raises(cs.ConvscopeError, match="expects 3 input channels, images have 1"):
        proj.project(x[:, :1], "conv5", channel=0)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(cs.ConvscopeError, match="NaN"):
        proj.project(bad, "conv5", channel=0)
    with pytest.raises(cs.ConvscopeError, match="valid modes: max, map"):
        proj.project(x, "conv5", channel=0, mode="mean")
    with pytest.raises(cs.ConvscopeError, match="one image"):
        proj.project_channels(x, "conv5", [0])
    with pytest.raises(cs.ConvscopeError, match="grad_output has shape"):
        proj.project(x, "conv5", grad_output=torch.ones(2, 64, 3, 3))
