"""The user's own model through every command: a ResNet-style net the package does not define, trained here on an
ImageFolder written here (partly from the photographs scikit-learn ships), its weights saved as a DataParallel
checkpoint; attach -> layers -> scan -> occlusion -> project -> report -> serve, each checked against numbers
computed here without convscope (brute force, Captum's Occlusion)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import MODEL_PY
from PIL import Image
from torch import nn

import convscope as cs
from convscope.cli import main
from convscope.layout import Layout
from convscope.topk import load_topk

SIZE = 32
CLASSES = ["china", "flower", "stripes"]
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_folder(root: Path, per_class: int = 8) -> None:
    """An ImageFolder: crops of scikit-learn's two photographs (china.jpg, flower.jpg) and drawn stripes."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB photographs
    g = np.random.default_rng(0)
    for name, photo in zip(CLASSES[:2], photos):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = int(g.integers(160, 400))
            y, x = int(g.integers(0, 427 - side)), int(g.integers(0, 640 - side))
            Image.fromarray(photo[y:y + side, x:x + side]).save(root / name / f"{i:02d}.jpg", quality=95)
    (root / CLASSES[2]).mkdir()
    for i in range(per_class):
        period = int(g.integers(4, 12))
        rows = (np.arange(64)[:, None] + np.arange(64)[None, :] * (i % 3)) // period % 2
        colour = g.integers(0, 256, 3)
        picture = np.where(rows[..., None] == 1, colour, 255 - colour).astype(np.uint8)
        Image.fromarray(picture).save(root / CLASSES[2] / f"{i:02d}.png")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's files: model.py, an ImageFolder, and weights trained for a few steps, saved as
    {"state_dict": {"module.<name>": ...}} in a .pth (what DataParallel training scripts write)."""
    root = tmp_path_factory.mktemp("user")
    (root / "model.py").write_text(MODEL_PY)
    write_folder(root / "images")
    module = import_file(root / "model.py", "user_model_for_training")
    torch.manual_seed(0)
    net = module.TinyResNet()
    data = cs.data.DataSpec("folder", str(root / "images"), SIZE).load("all")
    x, y = data.batch(torch.arange(len(data)))
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(30):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 30}, root / "weights.pth")
    return root


@pytest.fixture(scope="module")
def attached(user, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mine"
    r = run_cli("attach", "--model", f"{user / 'model.py'}:TinyResNet", "--weights", user / "weights.pth",
                "--data", "folder", "--data-root", user / "images", "--image-size", SIZE,
                "--normalize", ",".join(map(str, MEAN + STD)), "--out", out)
    assert r.exit_code == 0, r.output
    return out


def reference(user):
    """The user's net with the trained weights, built here without convscope, taking [0, 1] images."""
    module = import_file(user / "model.py", "user_model_reference")
    net = module.TinyResNet()
    state = torch.load(user / "weights.pth", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return net.eval(), lambda x: net((x - mean) / std)


def test_attach_records_the_run_and_reopens_it(user, attached):
    record = json.loads((attached / "attach.json").read_text())
    assert record["model"].endswith("model.py:TinyResNet") and record["classes"] == CLASSES
    assert record["data"] == {"name": "folder", "root": str((user / "images").resolve()), "size": SIZE, "seed": 0}
    assert record["normalize"] == {"mean": MEAN, "std": STD, "source": "the mean and std given to attach"}
    assert len(record["weights_sha256"]) == 64
    run = cs.open_run(attached)
    net, forward = reference(user)
    x = run.split("all").batch(torch.arange(6))[0]
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), forward(x), rtol=1e-5, atol=1e-5)
    # the normalisation is declared as values, applied once before the first module, kept by a copy, removable
    from convscope.forward import preprocessing_hook, unprepare

    declared = run.preprocessing
    assert (declared.mean, declared.std) == (tuple(MEAN), tuple(STD)) and not declared.follow_device
    assert declared.source == "the mean and std given to attach" and len(run.model._forward_pre_hooks) == 1
    assert run.to("cpu").preprocessing.follow_device and len(run.model._forward_pre_hooks) == 1  # the same hook
    copied = copy.deepcopy(run.model)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), forward(x), rtol=1e-5, atol=1e-5)
        unprepare(copied)
        assert preprocessing_hook(copied) is None and not copied._forward_pre_hooks
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        torch.testing.assert_close(copied((x - mean) / std), forward(x), rtol=1e-5, atol=1e-5)
    assert preprocessing_hook(run.model) is not None  # the run's own model keeps its own
    assert run.kind == "attached" and len(run.split("all")) == 24
    assert run.map_layers() == ["layer1", "layer2", "layer3"] and run.vector_layer() == "avgpool"
    # attaching the same again is a no-op; another model into the same directory is refused
    assert run_cli("attach", "--model", record["model"], "--weights", user / "weights.pth", "--data-root",
                   user / "images", "--image-size", SIZE, "--normalize", ",".join(map(str, MEAN + STD)),
                   "--out", attached).exit_code == 0
    r = run_cli("attach", "--model", record["model"], "--weights", user / "weights.pth", "--data-root",
                user / "images", "--image-size", SIZE, "--out", attached)
    assert r.exit_code == 2 and "already holds another attachment (it differs in normalize)" in r.output


def test_layers_lists_shapes_fields_and_the_reused_relu(attached):
    r = run_cli("layers", attached)
    assert r.exit_code == 0, r.output
    rows = {}
    for line in r.output.splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == "*":
            cols = cols[1:] + ["default"]
        if cols:
            rows[cols[0]] = cols
    # the stages (the last module at each map size) and the penultimate module are the defaults
    assert [name for name, cols in rows.items() if cols[-1] == "default"] == ["layer1", "layer2", "layer3", "avgpool"]
    # receptive field and stride, by hand: stem 3x3 -> 3; layer1 two 3x3 -> 7; layer2 3x3 stride 2 (+2), 3x3 at
    # stride 2 (+4) -> 13; layer3 likewise at strides 2 and 4 (+4, +8) -> 25
    assert rows["layer1"][2:5] == ["8x32x32", "7", "1"]
    assert rows["layer2"][2:5] == ["16x16x16", "13", "2"]
    assert rows["layer3"][2:5] == ["32x8x8", "25", "4"]
    assert rows["fc"][2:5] == ["3", "-", "-"] and rows["fc"][5] == "vector"
    assert "runs 2x: layer1.relu = first call, layer1.relu#2" in " ".join(rows["layer1.relu"])


def test_scan_top1_is_the_brute_force_maximum(user, attached):
    r = run_cli("scan", attached, "--units", "0", "--layers", "layer2,layer1.relu#2,layer3")
    assert r.exit_code == 0, r.output
    topk, info = load_topk(Layout(attached).topk)
    assert info["split"] == "all" and topk.seen == 24
    net, forward = reference(user)
    data = cs.open_run(attached).split("all")
    x = data.batch(torch.arange(len(data)))[0]
    seen = {}
    hooks = [net.layer2.register_forward_hook(lambda m, i, o: seen.setdefault("layer2", o.detach().clone())),
             net.layer3.register_forward_hook(lambda m, i, o: seen.setdefault("layer3", o.detach().clone()))]
    calls = []
    hooks.append(net.layer1.relu.register_forward_hook(lambda m, i, o: calls.append(o.detach().clone())))
    with torch.no_grad():
        forward(x)
    for h in hooks:
        h.remove()
    seen["layer1.relu#2"] = calls[1]  # the block's second ReLU: its output
    for layer, act in seen.items():
        per_image = act.flatten(2).amax(2)  # (N, C)
        best, image = per_image.max(0)  # ties: the first image, as the scan orders them
        torch.testing.assert_close(topk.values[layer][:, 0], best, rtol=1e-5, atol=1e-6)
        assert torch.equal(topk.images[layer][:, 0], image), layer
        units = list((Layout(attached).units / layer).glob("unit_*.jpg"))
        assert len(units) == act.shape[1]  # --units 0: every unit drawn


def test_occlusion_equals_captum(user, attached):
    import captum.attr as captum_attr
    r = run_cli("occlusion", attached, "--n", "2", "--size", "8", "--stride", "8", "--layer", "layer3")
    assert r.exit_code == 0, r.output
    saved = json.loads(Layout(attached).figure("fig7", ".json").read_text())["images"]
    net, forward = reference(user)
    data = cs.open_run(attached).split("all")
    for i, entry in enumerate(saved):
        x = data.batch(torch.tensor([i]))[0]
        assert entry["label_source"] == "true" and entry["label"] == CLASSES[int(data.labels[i])]
        fill = torch.tensor(entry["fill"]).view(1, 3, 1, 1).expand_as(x)
        attr = captum_attr.Occlusion(lambda z: forward(z).softmax(-1)).attribute(
            x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), baselines=fill, target=int(data.labels[i]))
        want = entry["prob_clean"] - torch.tensor(entry["prob"])  # (4, 4): one square per 8x8 block
        torch.testing.assert_close(attr[0, 0, ::8, ::8], want.float(), rtol=1e-4, atol=1e-5)
        assert torch.equal(attr[0, 0], attr[0, 2])  # a square covers all channels


def test_project_writes_each_images_maps_with_their_patches(user, attached, tmp_path):
    files = sorted((user / "images" / "china").glob("*.jpg"))[:2]
    out = tmp_path / "proj.png"
    r = run_cli("project", attached, "--image", files[0], "--image", files[1], "--layer", "layer2",
                "--channels", "0,3,5", "--out", out)
    assert r.exit_code == 0, r.output
    numbers = json.loads(out.with_suffix(".json").read_text())
    run = cs.open_run(attached)
    net, forward = reference(user)
    from convscope.data.folder import read_image

    x = torch.stack([read_image(f, SIZE).float() / 255 for f in files])
    seen = []
    handle = net.layer2.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        forward(x)
    handle.remove()
    for i, entry in enumerate(numbers["images"]):
        assert entry["image"] == files[i].name and [m["channel"] for m in entry["maps"]] == [0, 3, 5]
        for m in entry["maps"]:
            act = seen[0][i, m["channel"]]
            assert m["value"] == pytest.approx(act.max().item(), rel=1e-5)
            assert act[tuple(m["position"])] == act.max()
            assert m["box"] == list(cs.receptive_field(run.model, "layer2", tuple(m["position"]), input_size=SIZE))
    assert Image.open(out).size[0] > 3 * 48
    r = run_cli("project", attached, "--image", files[0], "--layer", "layer2", "--channels", "99", "--out", out)
    assert r.exit_code == 2 and "channel 99 out of range: layer 'layer2' has 16 maps" in r.output


@pytest.fixture
def figures(attached):
    """The scan and occlusion of the tests above, run here where a test runs alone or first (they write the same
    files: each command is idempotent on the same options)."""
    layout = Layout(attached)
    if not (layout.units / "layer3").is_dir():
        assert run_cli("scan", attached, "--units", "0", "--layers", "layer2,layer1.relu#2,layer3").exit_code == 0
    if not layout.figure("fig7").is_file():
        assert run_cli("occlusion", attached, "--n", "2", "--size", "8", "--stride", "8", "--layer",
                       "layer3").exit_code == 0
    return attached


def test_report_lists_the_attached_runs_figures(figures):
    attached = figures
    assert run_cli("report", attached).exit_code == 0
    html = (attached / "report.html").read_text()
    for key in ("fig2", "fig7"):
        assert f'id="{key}"' in html
    assert "Your model" in html and "TinyResNet" in html
    assert "convscope train" not in html  # an attached run is not told to train


@pytest.mark.slow
def test_report_from_file_and_the_viewers_deep_link_in_chromium(figures):
    """The report opened from file:// shows every image, and the viewer's address of one unit shows that unit."""
    attached = figures
    from helpers import CHROMIUM, Watched, require_chromium, serving

    require_chromium()
    from helpers import ARGS
    from playwright.sync_api import sync_playwright

    assert run_cli("report", attached).exit_code == 0
    unit = sorted(int(p.stem.split("_")[1]) for p in (Layout(attached).units / "layer2").glob("unit_*.jpg"))[5]
    with sync_playwright() as p, serving(attached) as (host, port):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        w = Watched(browser)
        w.page.goto((attached / "report.html").as_uri())
        w.page.wait_for_load_state("load")
        images = w.images()
        assert len(images) >= 4 and all(complete and width > 0 for _, complete, width in images), images
        w.page.goto(f"http://{host}:{port}/layer/layer2/unit/{unit}")
        assert w.page.locator("#unit-title").get_attribute("data-layer") == "layer2"
        assert w.page.locator("#unit-title").get_attribute("data-unit") == str(unit)
        shown = {alt: width for alt, _, width in w.images()}
        assert shown[f"layer2 unit {unit}"] == image_width(Layout(attached).unit("layer2", unit))
        w.page.keyboard.press("ArrowDown")
        w.page.wait_for_url(f"http://{host}:{port}/layer/layer3/unit/0")
        assert w.errors == [] and w.dialogs == []
        browser.close()


def image_width(path: Path) -> int:
    with Image.open(path) as im:
        return im.size[0]


# ------------------------------------------------------------------------------------------ bad input


def test_bad_specs_weights_and_images_exit_2_and_write_nothing(user, tmp_path):
    base = ["--data-root", user / "images", "--image-size", SIZE]
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "nomodule.py").write_text("def make():\n    return 42\n")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.pth")
    net = f"{user / 'model.py'}:TinyResNet"
    cases = [
        ([f"{tmp_path / 'broken.py'}:Net"], "cannot import the model spec", "No module named 'not_a_module_anywhere'"),
        (["no_such_package.models:Net"], "cannot import the model spec 'no_such_package.models:Net'", "ModuleNotFound"),
        ([f"{tmp_path / 'nomodule.py'}:make"], "returned 42 (int), not an nn.Module", ""),
        ([net, "--weights", tmp_path / "other.pth"], "do not fit", "missing from the file"),
        ([net, "--weights", tmp_path / "evil.pth"], "refused to load", "weights_only"),
        ([net, "--model-arg", "width=oops"], "raised TypeError", ""),
        ([net, "--model-arg", "no equals sign"], "--model-arg takes key=value", ""),
        ([net, "--normalize", "0.5,0.5"], "--normalize takes 'imagenet', 'none' or six numbers", ""),
        ([net, "--nonlinearities", "ignore"], "unknown nonlinearities option 'ignore'", "error, gradient"),
        (["resnet50"], "neither a built-in model", "package.module:callable"),
    ]
    for i, (spec, message, detail) in enumerate(cases):
        out = tmp_path / f"run{i}"
        r = run_cli("attach", "--model", *spec, *base, "--out", out)
        assert r.exit_code == 2, (spec, r.output)
        assert message in r.output and detail in r.output, r.output
        assert "this ran" not in r.output and not out.exists()


def test_images_the_model_cannot_take_say_which_size_it_expects(tmp_path, user):
    (tmp_path / "fixed.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32 * 32, 3))\n")
    r = run_cli("attach", "--model", f"{tmp_path / 'fixed.py'}:make", "--data-root", user / "images",
                "--image-size", 64, "--out", tmp_path / "run")
    assert r.exit_code == 2 and "cannot take 64x64 images" in r.output and "it takes 32 px" in r.output
    assert "pass --image-size 32" in r.output and not (tmp_path / "run").exists()


def test_weights_that_changed_since_attach_are_refused(user, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes((user / "weights.pth").read_bytes())
    out = tmp_path / "run"
    assert run_cli("attach", "--model", f"{user / 'model.py'}:TinyResNet", "--weights", weights, "--data-root",
                   user / "images", "--image-size", SIZE, "--out", out).exit_code == 0
    state = torch.load(weights, weights_only=True)
    state["state_dict"]["module.fc.bias"] += 1
    torch.save(state, weights)
    r = run_cli("scan", out)
    assert r.exit_code == 2 and "changed since it was attached" in r.output
    assert not Layout(out).topk.exists()


def test_python_attach_of_a_model_object(user, tmp_path):
    net, _ = reference(user)
    data = cs.data.DataSpec("folder", str(user / "images"), SIZE).load("all")
    run = cs.attach(net, data, tmp_path / "nb", normalize=MEAN + STD)
    assert not net._forward_pre_hooks  # the caller's model is left as it was
    from convscope.analyses import get

    result, paths = get("occlusion").run(run, n=1, layer="layer3")
    assert result.images[0].layer == "layer3" and paths[0].is_file()
    r = run_cli("scan", tmp_path / "nb")
    assert r.exit_code == 2 and "attached from Python with a model object" in r.output


# ------------------------------------------------------------------------- other nonlinearities (MobileNetV2)

MOBILE_PY = '''
from torch import nn


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise convolution, ReLU6, linear 1x1 projection, skip."""

    def __init__(self, c, expand=4):
        super().__init__()
        hidden = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(True))
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6(True))
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


def mobilenet(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(True),
                         InvertedResidual(8), InvertedResidual(8), nn.Conv2d(8, 16, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


@pytest.fixture(scope="module")
def mobile(user, tmp_path_factory):
    root = tmp_path_factory.mktemp("mobile")
    (root / "mobile.py").write_text(MOBILE_PY)
    net = import_file(root / "mobile.py", "user_mobile").mobilenet()
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # running statistics of a trained net: not the identity
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    torch.save(net.state_dict(), root / "mobile.pth")
    return root


def test_mobilenet_block_projects_with_gradient_nonlinearities_and_equals_captum(user, mobile, tmp_path):
    from helpers import activation, captum, close

    spec = ["--model", f"{mobile / 'mobile.py'}:mobilenet", "--weights", mobile / "mobile.pth", "--data-root",
            user / "images", "--image-size", SIZE]
    image = sorted((user / "images" / "flower").glob("*.jpg"))[0]
    # without the option: attach says at once what the projections will stop on, and how to pass it
    r = run_cli("attach", *spec, "--out", tmp_path / "strict")
    assert r.exit_code == 0 and "note: this model calls nonlinearities other than ReLU: hardtanh (5 calls)" in r.output
    assert "attach with --nonlinearities gradient" in r.output
    # and the projection that meets one names the module, its class and the option
    r = run_cli("project", tmp_path / "strict", "--image", image, "--layer", "5", "--out", tmp_path / "p.png")
    assert r.exit_code == 2 and "module '2' (ReLU6, which calls hardtanh)" in r.output
    assert "--nonlinearities gradient" in r.output and not (tmp_path / "p.png").exists()
    # with it: deconvnet for the ReLU, the plain gradient for ReLU6, as Captum's NeuronDeconvolution does
    r = run_cli("attach", *spec, "--nonlinearities", "gradient", "--out", tmp_path / "lenient")
    assert r.exit_code == 0 and "nonlinearities other than ReLU" not in r.output
    run = cs.open_run(tmp_path / "lenient")
    assert run.nonlinearities == "gradient"
    x = run.split("all").batch(torch.arange(3))[0]
    for layer in ("4", "6", "4.depthwise.2"):
        act = activation(run.model.eval(), layer, x)[0]
        neuron = tuple(int(i) for i in np.unravel_index(int(act.argmax()), tuple(act.shape)))  # active in image 0
        got = cs.Projector(run.model, "deconvnet", run.nonlinearities).project(x, layer, channel=neuron[0],
                                                                               position=neuron[1:])
        assert close(got, captum(run.model.eval(), layer, x, "deconvnet", neuron), rel=1e-5), layer
    r = run_cli("project", tmp_path / "lenient", "--image", image, "--layer", "6", "--out", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["nonlinearities"] == "gradient"
    # every figure and page it affects says so
    assert run_cli("scan", tmp_path / "lenient", "--layers", "6", "--units", "2").exit_code == 0
    assert run_cli("report", tmp_path / "lenient").exit_code == 0
    assert "other than ReLU by their plain gradient" in (tmp_path / "lenient" / "report.html").read_text()
    tile = np.asarray(Image.open(sorted((Layout(tmp_path / "lenient").units / "6").glob("unit_*.jpg"))[0]))
    band = tile[-14:]  # the note: dark red text on a white band below the projections (JPEG: white within 5)
    assert (band >= 250).all(-1).mean() > 0.7 and ((band[..., 0] > 60) & (band[..., 1] < 40)).any()
    assert load_topk(Layout(tmp_path / "lenient").topk)[1]["nonlinearities"] == "gradient"
    from starlette.testclient import TestClient

    from convscope.viewer import make_app

    viewer = TestClient(make_app(tmp_path / "lenient"), base_url="http://127.0.0.1")
    unit = int(sorted((Layout(tmp_path / "lenient").units / "6").glob("unit_*.jpg"))[0].stem.split("_")[1])
    for url in ("/layer/6", f"/layer/6/unit/{unit}"):  # the viewer's pages of the projections say so too
        page = viewer.get(url)
        assert page.status_code == 200 and "other than ReLU by their plain gradient" in page.text, url
    strict = TestClient(make_app(tmp_path / "strict"), base_url="http://127.0.0.1").get("/")
    assert "other than ReLU by their plain gradient" not in strict.text  # and only where the run passes them so


def test_commands_say_which_layers_they_use_and_what_a_run_cannot_do(user, attached, tmp_path):
    r = run_cli("occlusion", attached, "--n", "1")
    assert r.exit_code == 0, r.output
    assert "the analyses use its stages layer1, layer2, layer3 (the last module at each map size) and its " \
           "penultimate module avgpool" in r.output
    assert json.loads(Layout(attached).figure("fig7", ".json").read_text())["images"][0]["layer"] == "layer3"
    # a module the forward pass runs twice, named without #k: its first call, and the note says so
    image = sorted((user / "images" / "china").glob("*.jpg"))[0]
    r = run_cli("project", attached, "--image", image, "--layer", "layer1.relu", "--out", tmp_path / "p.png")
    assert r.exit_code == 0 and "note: module 'layer1.relu' runs 2 times in one forward pass; convscope probes " \
                                "its first call (name layer1.relu#2 .. #2 for another" in r.output
    # what the run cannot do says why, and what would make it possible
    r = run_cli("evolution", attached)
    assert r.exit_code == 2 and "no epoch checkpoints" in r.output and "--checkpoints DIR" in r.output
    r = run_cli("invariance", attached, "--mode", "render")
    assert r.exit_code == 2 and "re-renders the embedded synthetic data" in r.output and "use mode 'warp'" in r.output
    r = run_cli("transfer", attached, "--target", "heldout")
    assert r.exit_code == 2 and "needs a run pretrained on the synthetic data set" in r.output


def test_layers_of_a_spec_and_attaching_other_data_sets(user, tmp_path):
    r = run_cli("layers", "--model", f"{user / 'model.py'}:TinyResNet", "--model-arg", "width=4", "--image-size", 16)
    assert r.exit_code == 0 and "4x16x16" in r.output and "at 16 px" in r.output
    for data in ("digits", "synthetic"):
        r = run_cli("attach", "--model", "zfnet_small", "--data", data, "--out", tmp_path / data)
        assert r.exit_code == 0, r.output
        record = json.loads((tmp_path / data / "attach.json").read_text())
        assert record["image_size"] == 64 and len(record["classes"]) == (10 if data == "digits" else 12)
    run = cs.open_run(tmp_path / "digits")
    assert len(run.split("test")) == 450 and run.split("test").image_size == 64
    # a spec without weights reopens with the same (seeded) weights
    again = cs.open_run(tmp_path / "digits")
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), again.model.state_dict().values()))


def test_layers_named_in_any_order_come_in_the_order_the_forward_pass_reaches_them(attached):
    run = cs.open_run(attached)
    assert run.check_layers(["layer3", "layer1.relu#2", "layer2", "layer3", "bn"]) == [
        "bn", "layer1.relu#2", "layer2", "layer3"]
