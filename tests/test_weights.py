"""The user's weights files: torchvision-layout state dicts load into the built-in nets and give the logits of a
net built here in torchvision's layer order; wrappers and prefixes are undone; nothing loads partially."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import convscope as cs
from convscope.cli import main
from convscope.errors import ConvscopeError
from convscope.weights import load_weights, read_state_dict, sha256, state_sha256

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_alexnet(num_classes: int) -> nn.Module:
    """torchvision.models.alexnet's layers, in its order (torchvision is not importable beside this torch)."""
    net = nn.Module()
    net.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(True), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True),
        nn.MaxPool2d(3, 2))
    net.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    net.classifier = nn.Sequential(nn.Dropout(), nn.Linear(9216, 4096), nn.ReLU(True), nn.Dropout(),
                                   nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, num_classes))
    net.forward = lambda x: net.classifier(torch.flatten(net.avgpool(net.features(x)), 1))
    return net


def torchvision_vgg16(num_classes: int) -> nn.Module:
    """torchvision.models.vgg16's layers (configuration "D", no batch norm), in its order."""
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(True)]
            c = v
    net = nn.Module()
    net.features = nn.Sequential(*layers)
    net.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    net.classifier = nn.Sequential(nn.Linear(25088, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096),
                                   nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))
    net.forward = lambda x: net.classifier(torch.flatten(net.avgpool(net.features(x)), 1))
    return net


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(2):
            pixels = torch.randint(0, 256, (240, 260, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name, reference", [("alexnet_torchvision", torchvision_alexnet),
                                             ("vgg16", torchvision_vgg16)])
def test_torchvision_layout_state_dicts_attach_to_the_built_in_nets(name, reference, folder, tmp_path):
    torch.manual_seed(0)
    ref = reference(10).eval()
    with torch.no_grad():  # random weights of a sensible scale, so the logits differ from class to class
        for p in ref.parameters():
            p.normal_(0, 0.02)
    torch.save(ref.state_dict(), tmp_path / "weights.pth")
    r = CliRunner().invoke(main, ["attach", "--model", name, "--weights", str(tmp_path / "weights.pth"),
                                  "--data-root", str(folder), "--normalize", "imagenet", "--out",
                                  str(tmp_path / "run")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "run" / "attach.json").read_text())
    assert record["model_args"] == {"num_classes": 10} and record["image_size"] == 224  # read off the weights
    run = cs.open_run(tmp_path / "run")
    x = run.split("all").batch(torch.arange(4))[0]
    with torch.no_grad():
        want = ref((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
        torch.testing.assert_close(run.model(x), want, rtol=1e-4, atol=1e-5)
    assert want.std() > 0
    # the paper's fc7 is the second fully connected layer, rectified: the same values as the reference's
    from convscope.forward import run_to
    from convscope.layers import site

    seen = []
    handle = ref.classifier[5 if name == "alexnet_torchvision" else 4].register_forward_hook(
        lambda m, i, o: seen.append(o.clone()))
    with torch.no_grad():
        ref((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
        got = run_to(run.model, site(run.model, "fc7"), x)
    handle.remove()
    torch.testing.assert_close(got, seen[0], rtol=1e-4, atol=1e-6)
    assert (got > 0).any() and (got == 0).any()  # rectified


def test_wrapped_and_prefixed_state_dicts_are_unwrapped(tmp_path):
    net = cs.create_model("zfnet_small", 4)
    state = net.state_dict()
    for i, obj in enumerate([state, {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
                             {"model": {f"_orig_mod.{k}": v for k, v in state.items()}},
                             {"model_state_dict": state, "optimizer": {"lr": 0.1}}]):
        torch.save(obj, tmp_path / f"{i}.pth")
        loaded = read_state_dict(tmp_path / f"{i}.pth")
        assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    other = cs.create_model("zfnet_small", 4)
    load_weights(other, tmp_path / "w.safetensors")
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in state)
    assert state_sha256(other.state_dict()) == state_sha256(state)
    assert sha256(tmp_path / "0.pth") != sha256(tmp_path / "1.pth")


def test_weights_that_do_not_fit_load_nothing_and_say_why(tmp_path):
    net = cs.create_model("zfnet_small", 4)
    state = net.state_dict()
    bad = dict(state)
    bad["classifier.fc8.weight"] = torch.zeros(7, 256)
    bad.pop("features.conv1.bias")
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    target = cs.create_model("zfnet_small", 4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConvscopeError) as e:
        load_weights(target, tmp_path / "bad.pth")
    message = str(e.value)
    assert "1 missing from the file: features.conv1.bias" in message
    assert "1 not in the model: extra.weight" in message
    assert "classifier.fc8.weight (7, 256) in the file, (4, 256) in the model" in message
    assert all(torch.equal(target.state_dict()[k], before[k]) for k in before)  # nothing loaded


@pytest.mark.parametrize("content, message", [
    (b"", "corrupt, truncated or not a PyTorch file"),
    (b"PK\x03\x04 not really a zip", "corrupt, truncated or not a PyTorch file"),
])
def test_damaged_files_are_reported(tmp_path, content, message):
    (tmp_path / "w.pth").write_bytes(content)
    with pytest.raises(ConvscopeError, match=message):
        read_state_dict(tmp_path / "w.pth")
    (tmp_path / "w.safetensors").write_bytes(content)
    with pytest.raises(ConvscopeError, match="not readable safetensors"):
        read_state_dict(tmp_path / "w.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConvscopeError, match="holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pth")


# ---------------------------------------------------------------------- checkpoints as training scripts save them


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _equal(model: nn.Module, state: dict) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and len(state) == len(
        model.state_dict())


def test_lightning_timm_ema_compile_and_ddp_checkpoints_are_found_and_said(tmp_path):
    from convscope.weights import find_weights

    trained, ema = _net(1).state_dict(), _net(2).state_dict()
    # PyTorch Lightning: the LightningModule's attribute as a prefix, its other modules beside it, and metadata
    lightning = {"state_dict": {**{f"model.{k}": v for k, v in trained.items()}, "loss.pos_weight": torch.ones(5)},
                 "pytorch-lightning_version": "2.4.0", "epoch": 9, "optimizer_states": [], "lr_schedulers": []}
    torch.save(lightning, tmp_path / "lightning.ckpt")
    model = _net(0)
    found = load_weights(model, tmp_path / "lightning.ckpt")
    assert (found.key, found.prefix, found.left) == ("state_dict", "model.", 1) and _equal(model, trained)
    assert found.note() == "the weights under 'state_dict', with the prefix 'model.' stripped (1 other tensors " \
                           "of the file left out)"
    # timm's train.py with --model-ema: the EMA weights are taken, as timm's load_checkpoint does; a key chooses
    torch.save({"epoch": 3, "arch": "net", "state_dict": trained, "state_dict_ema": ema}, tmp_path / "timm.pth.tar")
    found = load_weights(model, tmp_path / "timm.pth.tar")
    assert (found.key, found.prefix) == ("state_dict_ema", "") and _equal(model, ema)
    assert found.note() == "the weights under 'state_dict_ema'"
    assert load_weights(model, tmp_path / "timm.pth.tar", key="state_dict").key == "state_dict"
    assert _equal(model, trained)
    # DistributedDataParallel around torch.compile: both wrappers' prefixes go, with nothing to say
    torch.save({f"module._orig_mod.{k}": v for k, v in ema.items()}, tmp_path / "ddp.pt")
    found = load_weights(model, tmp_path / "ddp.pt")
    assert found.note() is None and _equal(model, ema)
    # a distillation checkpoint: two prefixes fit, so none is guessed; a prefix chooses
    both = {**{f"teacher.{k}": v for k, v in trained.items()}, **{f"student.{k}": v for k, v in ema.items()}}
    torch.save(both, tmp_path / "distil.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConvscopeError, match=r"the prefixes 'teacher\.', 'student\.'; choose one with --weights-pre"):
        load_weights(model, tmp_path / "distil.pt")
    assert _equal(model, before)  # nothing loaded
    assert load_weights(model, tmp_path / "distil.pt", prefix="student.").prefix == "student." and _equal(model, ema)
    # nothing fits: the error says where the keys start, and how to choose
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in _net(3)[:1].state_dict().items()}}, tmp_path / "x.pt")
    with pytest.raises(ConvscopeError, match=r"do not fit the model .*keys start with encoder\. \(2\).*--weights-key"):
        find_weights(model, tmp_path / "x.pt")
    with pytest.raises(ConvscopeError, match=r"no state dict under 'ema'; its state dicts are under: state_dict"):
        find_weights(model, tmp_path / "x.pt", key="ema")


def test_attach_says_what_it_took_from_a_lightning_checkpoint_and_reopens_the_same(tmp_path, monkeypatch):
    from convscope import weights

    reads = []
    real = weights._read_torch
    monkeypatch.setattr(weights, "_read_torch", lambda path: reads.append(path) or real(path))
    net = cs.create_model("zfnet_small", num_classes=3)
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.4.0"}, tmp_path / "last.ckpt")
    images = tmp_path / "images"
    for c in ("a", "b", "c"):
        (images / c).mkdir(parents=True)
        Image.new("RGB", (64, 64), (40 * len(c), 90, 10)).save(images / c / "0.png")
    r = CliRunner().invoke(main, ["attach", "--model", "zfnet_small", "--weights", str(tmp_path / "last.ckpt"),
                                  "--data", "folder", "--data-root", str(images), "--image-size", "64",
                                  "--out", str(tmp_path / "run")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert len(reads) == 1  # the file is read once, for the outputs and for the weights
    assert "note: weights: the weights under 'state_dict', with the prefix 'model.' stripped" in r.output
    record = json.loads((tmp_path / "run" / "attach.json").read_text())
    assert (record["weights_key"], record["weights_prefix"]) == ("state_dict", "model.")
    again = cs.open_run(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), net.state_dict().values()))
