"""Naming layers: paper aliases, module names, the k-th call of a module the forward pass runs more than once, and
the layers the analyses use by default on a model without the paper's names."""

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import write_png
from torch import nn
from tvnets import ConvNeXt, EfficientNet, ResNet50, SqueezeExcitation

import convscope as cs
from convscope.cli import main
from convscope.forward import run_to, run_to_all
from convscope.layers import census, feature_layers, map_layers, site, vector_layer
from convscope.receptive_field import layer_table, receptive_field


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


def gradient_box(model: nn.Module, layer: str, position, size: int, channels_last: bool = False
                 ) -> tuple[int, int, int, int]:
    """The bounding box (y0, x0, y1, x1) of the nonzero input gradient of unit ``position`` of the first channel of
    ``layer`` (``channels_last``: its output is (N, H, W, C)), on a random positive image, in float64."""
    module = dict(model.named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, o: seen.append(o))
    x = (torch.rand(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5)
    model(x.requires_grad_(True))
    handle.remove()
    out = seen[0]
    unit = out[0, position[0], position[1], 0] if channels_last else out[0, 0, position[0], position[1]]
    (g,) = torch.autograd.grad(unit, x)
    nz = g[0].abs().sum(0).nonzero()
    return int(nz[:, 0].min()), int(nz[:, 1].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].max()) + 1


def field_and_stride(model: nn.Module, layer: str, size: int, rows: int, cols: int, channels_last: bool
                     ) -> tuple[int, int]:
    """A unit's field (the side of its gradient's support, far from the border) and the step between neighbours,
    measured at the centre of ``size``-px images, where the layer's maps are ``rows x cols``."""
    y0, x0, y1, x1 = gradient_box(model, layer, (rows // 2, cols // 2), size, channels_last)
    return max(y1 - y0, x1 - x0), gradient_box(model, layer, (rows // 2, cols // 2 + 1), size, channels_last)[1] - x0


CHANNELS_LAST = ("block.1", "block.2", "block.3", "block.4", "block.5")  # a CNBlock's tensors between its permutes


@pytest.mark.parametrize("arch", ["convnext", "efficientnet"])
def test_modern_cnns_fields_equal_the_gradient_support_and_defaults_are_the_stage_outputs(arch):
    """Before: every module past the stem had a field of the whole image (896 px at 224) and a stride of 0, a
    ConvNeXt block's channels-last tensors were offered as maps with their rows for channels, and an EfficientNet's
    defaults were the next stage's first expansion conv."""
    torch.manual_seed(0)
    model = (ConvNeXt(layer_scale=0.5) if arch == "convnext" else EfficientNet()).double().eval()
    rows = {r.name: r for r in layer_table(model, 64)}
    infos = census(model, 64)
    if arch == "convnext":
        stages, vector, big = ["features.1", "features.3", "features.5", "features.7"], "classifier.1", 640
        last = {n for n in rows if n.endswith(CHANNELS_LAST)}
        assert len(last) == 5 * 5 and all(rows[n].probe == "channels last" for n in last)
        assert rows["features.1.0.block.4"].shape == (16, 16, 32)  # rows, columns, 4 x 8 channels: not 16 maps
        assert {i.name for i in infos if i.maps} & last == set()
        probed = [*stages, "features.0", "features.4", *(f"features.3.0.{b}" for b in ("block.0", *CHANNELS_LAST))]
    else:
        stages, vector, big = ["features.1", "features.2", "features.3", "features.6"], "avgpool", 320
        assert not any(r.probe == "channels last" for r in rows.values())
        probed = [*stages, "features.0", "features.5", *(f"features.3.0.block.{b}" for b in range(4))]
    assert map_layers(model, infos) == stages and vector_layer(model, infos, 10) == vector
    assert [n for n, r in rows.items() if r.default] == [*stages, vector]
    conv_path = model
    if arch == "efficientnet":  # the convolutional path: squeeze-and-excitation's weights taken as constants
        conv_path = copy.deepcopy(model)
        for m in conv_path.modules():
            if isinstance(m, SqueezeExcitation):
                m.detached = True
    for name in probed:
        row, info = rows[name], next(i for i in infos if i.name == name)
        last = row.probe == "channels last"
        r, c = (info.shape[1:3] if last else info.shape[2:4])
        scale = big // 64
        assert (row.field, row.stride) == field_and_stride(conv_path, name, big, r * scale, c * scale, last), name
        assert row.stride > 0
    if arch == "efficientnet":  # a unit past the first squeeze-and-excitation depends on the whole image as well
        gated = {n for n, r in rows.items() if r.gated}
        assert "features.0" not in gated and "features.1.0.block.0" not in gated
        assert {"features.1.0.block.1", *stages} <= gated
        assert gradient_box(model, "features.2", (8, 8), 64) == (0, 0, 64, 64)
        assert gradient_box(conv_path, "features.2", (8, 8), 64) != (0, 0, 64, 64)
    else:
        assert not any(r.gated for r in rows.values())
    # Fig. 2's patches: the convolutional path's box, clipped to the image, at the run's size
    for name, pos in ((stages[1], (0, 3)), (stages[2], (2, 1))):
        assert tuple(receptive_field(model, name, pos, 64)) == gradient_box(conv_path, name, pos, 64), name


def test_a_channels_last_layer_is_refused_by_name_and_layers_says_why(tmp_path):
    """``convscope layers`` also says at once which nonlinearities deconvnet has no rule for (issue 27, point 6)."""
    for i in range(4):
        write_png(tmp_path / "images" / f"c{i % 2}" / f"{i}.png", size=(64, 64), color=(60 * i, 90, 200 - 40 * i))
    spec = f"{Path(__file__).parent / 'tvnets.py'}:ConvNeXt"
    run = cs.attach(spec, "folder", tmp_path / "run", data_root=tmp_path / "images", image_size=64,
                    model_args={"num_classes": 2}, normalize="none", nonlinearities="gradient")
    assert run.check_layers(["features.5", "features.1"]) == ["features.1", "features.5"]
    with pytest.raises(cs.ConvscopeError, match=r"layer 'features.1.0.block.4' gives channels-last tensors "
                       r"\(16x16x32: rows, columns, channels\), not feature maps; .* such as the block around it, "
                       r"features.1.0.block "):
        run.check_layers(["features.1.0.block.4"])
    r = CliRunner().invoke(main, ["layers", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.split()[0] == "features.1.0.block.4")
    assert line.split()[2:] == ["16x16x32", "28", "4", "channels", "last"]
    assert "channels last: (N, H, W, C) tensors between two permutes" in r.output
    assert "note: this model calls nonlinearities other than ReLU: gelu (5 calls)." in r.output
    assert "this run passes the others by their gradient" in r.output  # attached with nonlinearities="gradient"
    r = CliRunner().invoke(main, ["layers", "--model", f"{Path(__file__).parent / 'tvnets.py'}:EfficientNet",
                                  "--image-size", "64"])
    line = next(x for x in r.output.splitlines() if x.split()[0] == "features.1.0.block.1")
    assert line.split()[2:6] == ["8x32x32", "7", "+global", "2"], line
    assert "+global: the unit also depends on the whole image through a gate" in r.output
    assert ("note: this model calls nonlinearities other than ReLU: sigmoid (7 calls), silu (22 calls). deconvnet "
            "and guided backpropagation have rules for ReLU only, so their projections will stop there: attach with "
            "--nonlinearities gradient") in r.output
