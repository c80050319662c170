"""Every registered model: shapes, finiteness, gradients; Fig. 3's map sizes; the Table 3 variants."""

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.models.convnet import ContrastNorm


def _map_sizes(model, x):
    sizes = {}
    h = model.normalize(x)
    for name, module in model.features.named_children():
        h = module(h)
        sizes[name] = tuple(h.shape[1:])
    return sizes


@pytest.mark.parametrize("name", cs.list_models())
def test_every_model_outputs_finite_logits_and_trains_every_parameter(name):
    torch.manual_seed(0)
    model = cs.create_model(name, num_classes=7)
    x = torch.rand(2, 3, model.input_size, model.input_size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    # a loss that reaches every weight even where tiny-init activations are small
    (out.square().sum() * 1e6).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    for alias in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
        name_, module = cs.resolve_layer(model, alias)
        assert isinstance(module, nn.ReLU), (alias, name_)


def test_zfnet_map_sizes_equal_fig3():
    model = cs.create_model("zfnet", num_classes=1000)
    s = _map_sizes(model, torch.zeros(1, 3, 224, 224))
    assert s["conv1"] == (96, 110, 110)
    assert s["pool1"] == (96, 55, 55)
    assert s["conv2"] == (256, 26, 26)
    assert s["pool2"] == (256, 13, 13)
    assert s["conv3"] == (384, 13, 13) and s["conv4"] == (384, 13, 13) and s["conv5"] == (256, 13, 13)
    assert s["pool5"] == (256, 6, 6)
    assert model.classifier.fc6.in_features == 9216 and model.classifier.fc6.out_features == 4096
    assert model.classifier.fc7.out_features == 4096
    assert model.classifier.drop6.p == 0.5 and model.classifier.drop7.p == 0.5
    names = [n for n, _ in model.features.named_children()]
    assert names.index("norm1") > names.index("pool1")  # ZF: contrast norm after pooling


def test_alexnet_is_the_papers_single_tower_replication():
    model = cs.create_model("alexnet", num_classes=1000)
    assert model.features.conv1.kernel_size == (11, 11) and model.features.conv1.stride == (4, 4)
    assert model.features.conv1.out_channels == 96
    s = _map_sizes(model, torch.zeros(1, 3, 224, 224))
    assert s["conv1"][1:] == (55, 55) and s["pool1"][1:] == (27, 27) and s["pool2"][1:] == (13, 13)
    assert s["pool5"] == (256, 6, 6)
    names = [n for n, _ in model.features.named_children()]
    assert names.index("norm1") < names.index("pool1")  # Krizhevsky: norm before pool


def test_small_nets_differ_only_in_the_first_layers():
    zf, alex = cs.create_model("zfnet_small", 10), cs.create_model("alexnet_small", 10)
    assert (zf.features.conv1.kernel_size, zf.features.conv1.stride) == ((7, 7), (2, 2))
    assert (alex.features.conv1.kernel_size, alex.features.conv1.stride) == ((11, 11), (4, 4))
    x = torch.zeros(1, 3, 64, 64)
    sz, sa = _map_sizes(zf, x), _map_sizes(alex, x)
    assert sz["conv1"][1:] == (32, 32) and sa["conv1"][1:] == (16, 16)
    for layer in ("pool2", "conv3", "conv4", "conv5", "pool5"):
        assert sz[layer] == sa[layer]
    for layer in ("conv3", "conv4", "conv5"):
        assert getattr(zf.features, layer).weight.shape == getattr(alex.features, layer).weight.shape


def test_table3_variants():
    base = sum(p.numel() for p in cs.create_model("zfnet_small", 10).parameters())
    no34 = cs.create_model("zfnet_small", 10, remove=("conv3", "conv4"))
    assert "conv3" not in no34.paper_layers and "conv4" not in no34.paper_layers
    assert no34.features.conv5.in_channels == 64
    no67 = cs.create_model("zfnet_small", 10, remove=("fc6", "fc7"))
    assert [n for n, m in no67.classifier.named_children() if isinstance(m, nn.Linear)] == ["fc8"]
    no7 = cs.create_model("zfnet_small", 10, remove=["fc7"])
    assert no7.classifier.fc8.in_features == 256
    wide = cs.create_model("zfnet_small", 10, fc=(512, 512), widths=(32, 64, 128, 256, 128))
    assert wide.classifier.fc6.out_features == 512 and wide.features.conv4.out_channels == 256
    for m in (no34, no67, no7, wide):
        assert m(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    assert sum(p.numel() for p in no34.parameters()) < base < sum(p.numel() for p in wide.parameters())
    with pytest.raises(cs.ConvscopeError, match="removable layers: conv3, conv4, fc6, fc7"):
        cs.create_model("zfnet_small", 10, remove=("conv1",))
    with pytest.raises(cs.ConvscopeError, match="unknown model options"):
        cs.create_model("zfnet_small", 10, depth=3)


def test_unknown_names_list_the_valid_ones():
    valid = "valid models: alexnet, alexnet_small, alexnet_torchvision, vgg16, zfnet, zfnet_small"
    with pytest.raises(cs.ConvscopeError, match=valid):
        cs.create_model("resnet50")
    model = cs.create_model("zfnet_small", 10)
    with pytest.raises(cs.ConvscopeError, match="valid layers: conv1, conv2, .*features.conv1"):
        cs.resolve_layer(model, "conv9")
    assert cs.resolve_layer(model, "fc6")[0] == "classifier.relu6"
    assert cs.resolve_layer(model, "features.conv1")[1] is model.features.conv1


def test_paper_init_and_contrast_norm():
    torch.manual_seed(0)
    model = cs.create_model("zfnet", num_classes=10)
    w = model.features.conv3.weight
    assert abs(w.std().item() - 0.01) < 2e-4 and model.features.conv3.bias.abs().max() == 0
    x = torch.randn(3, 16, 5, 5, requires_grad=True)
    ours, ref = ContrastNorm(5, 1e-4, 0.75, 2.0), nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    torch.testing.assert_close(ours(x * 30), ref(x * 30), rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(ours(x * 30).sum(), x)[0]
    g2 = torch.autograd.grad(ref(x * 30).sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_normalize_is_identity_until_trained_and_falls_back_off_size():
    model = cs.create_model("zfnet_small", 10)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(model.normalize(x), x)
    model.normalize.mean.fill_(0.5)
    model.normalize.std.fill_(0.25)
    torch.testing.assert_close(model.normalize(x), (x - 0.5) / 0.25)
    y = torch.rand(1, 3, 80, 80)
    torch.testing.assert_close(model.normalize(y), (y - 0.5) / 0.25)
