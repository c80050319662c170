"""Naming layers: paper aliases, module names, the k-th call of a module the forward pass runs more than once, and
the layers the analyses use by default on a model without the paper's names."""

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.forward import run_to, run_to_all
from convscope.layers import census, feature_layers, map_layers, site, vector_layer
from convscope.receptive_field import layer_table


class Twice(nn.Module):
    """One ReLU module called twice, then a pool that halves the map, a second stage, and a head."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 5)

    def forward(self, x):
        x = self.relu(self.conv(x))
        x = self.relu(x - 0.5)  # the same module again
        return self.fc(self.pool(self.down(x)).flatten(1))


def test_a_call_suffix_picks_the_kth_call():
    net, x = Twice().eval(), torch.randn(2, 3, 8, 8)
    assert site(net, "relu") == cs.layers.Site("relu", net.relu, 1)
    assert site(net, "relu#2").call == 2 and cs.resolve_layer(net, "relu#2") == ("relu", net.relu)
    first = torch.relu(net.conv(x))
    torch.testing.assert_close(run_to(net, site(net, "relu"), x), first)
    torch.testing.assert_close(run_to(net, site(net, "relu#2"), x), torch.relu(first - 0.5))
    with pytest.raises(cs.ConvscopeError, match="ran 2 time"):
        run_to_all(net, [site(net, "relu#3")], x)
    with pytest.raises(cs.ConvscopeError, match="unknown layer 'relu#x'"):
        site(net, "relu#x")


def test_defaults_of_a_model_without_paper_names():
    net = Twice()
    infos = census(net, 8)
    calls = {i.name: i.calls for i in infos}
    assert calls["relu"] == 2 and calls["down.2"] == 1 and calls["fc"] == 1
    # the last module called once at each map size: the 8x8 stage has only the twice-called ReLU and the conv
    assert map_layers(net, infos) == ["conv", "down"]
    assert vector_layer(net, infos, 5) == "pool" and feature_layers(net, infos, 5) == ["conv", "down", "pool"]
    rows = {r.name: r for r in layer_table(net, 8)}
    assert (rows["down"].field, rows["down"].stride) == (8, 2)  # 3x3, pool 2, 3x3 at stride 2: 3 + 1 + 4
    assert rows["relu"].calls == 2 and rows["fc"].probe == "vector" and rows["down"].default
    built_in = cs.create_model("zfnet_small", 10)
    assert map_layers(built_in, census(built_in, 64)) == ["conv1", "conv2", "conv3", "conv4", "conv5"]


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (v1.5: the stride on the 3x3 conv), one ReLU module called three times;
    ``avg_down``: timm's ResNet-D shortcut (average pool, then a 1x1 conv of stride 1)."""

    def __init__(self, cin, width, stride, avg_down=False):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            if avg_down and stride != 1:
                self.downsample = nn.Sequential(nn.AvgPool2d(stride, stride), nn.Conv2d(cin, cout, 1, bias=False),
                                                nn.BatchNorm2d(cout))
            else:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 module layout (3, 4, 6, 3 bottlenecks) at an eighth of its width; ``deep_stem``
    and ``avg_down``: timm's ResNet-D (a stem of three 3x3 convs, average-pool shortcuts)."""

    def __init__(self, num_classes=10, deep_stem=False, avg_down=False, base=8):
        super().__init__()
        if deep_stem:
            self.conv1 = nn.Sequential(nn.Conv2d(3, base, 3, 2, 1), nn.BatchNorm2d(base), nn.ReLU(),
                                       nn.Conv2d(base, base, 3, 1, 1), nn.BatchNorm2d(base), nn.ReLU(),
                                       nn.Conv2d(base, base, 3, 1, 1))
        else:
            self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(base), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin, stages = base, []
        for i, blocks in enumerate((3, 4, 6, 3)):
            width = base * 2 ** i
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1, avg_down))
                cin = width * 4
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("resnet_d", [False, True], ids=["resnet50", "resnet50d"])
def test_the_defaults_of_a_resnet50_are_its_stages(resnet_d):
    """Before: the first batch norm of each next stage's first block (layer2.0.bn1: it finishes at the old size,
    after the stage) stood for layer1..layer3; on a ResNet-D, layer4.0's first activation."""
    model = ResNet50(deep_stem=resnet_d, avg_down=resnet_d).eval()
    infos = census(model, 64)
    assert map_layers(model, infos) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert vector_layer(model, infos, 10) == "avgpool"
    assert feature_layers(model, infos, 10) == ["relu", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    sizes = {i.name: i.shape[-1] for i in infos if i.name in ("relu", "layer1", "layer2", "layer3", "layer4")}
    assert sizes == {"relu": 32, "layer1": 16, "layer2": 8, "layer3": 4, "layer4": 2}
