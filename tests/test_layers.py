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
