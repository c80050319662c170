"""Helpers the tests share: constants, small data, the fake run, a served viewer and a watched browser page,
the deconvnet oracles. Fixtures stay in conftest.py."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
import warnings
from pathlib import Path

import captum.attr as captum_attr
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs

CHROMIUM = "/usr/bin/chromium"


def require_chromium() -> None:
    """Skip a browser test where Debian's Chromium is missing, but fail it under CI (``CI`` set), which installs
    Chromium: a browser test must not turn into a silent skip there."""
    from pathlib import Path

    if Path(CHROMIUM).exists():
        return
    message = f"no chromium at {CHROMIUM} (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI installs it, so its absence here is an error")
    pytest.skip(message)


# The training seed of every trained fixture. CI trains seed 0; scripts/seeds.py runs the trained tests again at
# other seeds (CONVSCOPE_TEST_SEED) to measure the spread behind each test's margin.
SEED = int(os.environ.get("CONVSCOPE_TEST_SEED", "0"))


TRAINED = dict(model="zfnet_small", data="synthetic", n_val=1000, n_test=1000, seed=SEED)  # 30 epochs


def random_imageset(labels, size=64, seed=0):
    """Seeded random uint8 images with the given labels: data for tests that need only shapes and classes."""
    import torch

    from convscope.data import ImageSet

    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    images = torch.randint(0, 256, (len(labels), 3, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(images, labels, [str(c) for c in range(int(labels.max()) + 1)])


def keyed(folder, name, options):
    """``folder/name-KEY``, KEY a hash of ``options`` and of the small nets' specs: a cached result is reused only
    for the same settings and the same models."""
    import hashlib
    import json

    from convscope.models.convnet import ALEXNET_SMALL, ZFNET_SMALL

    key = json.dumps([options, repr(ZFNET_SMALL), repr(ALEXNET_SMALL)], sort_keys=True)
    return folder / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def untrained_twin(run):
    """A trained run's control: the same model, data and input preprocessing, its weights as training started
    (the same seeded initialisation). A property test of training must fail on it."""

    import torch

    from convscope.models import create_model

    cfg = run.config
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, num_classes=len(run.classes), **cfg.model_options)
    model.normalize.load_state_dict(run.model.normalize.state_dict())
    twin = copy.copy(run)
    twin.model = model.eval()
    return twin


TINY_ARGS = {"widths": [8, 8, 12, 12, 8], "fc": [16, 16]}  # a narrow zfnet_small: analyses run in a second


EVIL = "<img src=x onerror=alert(1)>"


def make_fake_run(root: Path) -> Path:
    """A small run directory: training outputs, a real (untrained) zfnet_small weights file with a malicious
    class name, a few Fig. 2 / Fig. 4 pictures, Fig. 6 and Fig. 7 figures, Table 1 and Table 7; no Fig. 5,
    Table 3 or transfer."""
    from convscope.checkpoint import save_weights
    from convscope.models import create_model

    root.mkdir(parents=True, exist_ok=True)
    config = {"model": "zfnet_small", "data": "synthetic", "epochs": 3, "seed": 0, "lr": 0.01, "momentum": 0.9,
              "renorm": True, "model_options": {}}
    (root / "config.json").write_text(json.dumps(config))
    metrics = [{"epoch": e, "lr": 0.01, "train_loss": 2.0 / e, "train_top1_err": 0.9 / e, "val_loss": 2.1 / e,
                "val_top1_err": 0.8 / e, "val_top5_err": 0.3 / e, "seconds": 1.5} for e in (1, 2, 3)]
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "test.json").write_text(json.dumps({"loss": 0.5, "top1_err": 0.1234, "top5_err": 0.0456}))
    (root / "timings.json").write_text(json.dumps({"train": 12.5, "scan": 3.0}))
    save_weights(root / "model.safetensors", create_model("zfnet_small", num_classes=3), config, 3, 3, CLASSES)
    fig = root / "figures"
    for layer in ("conv1", "conv5"):
        write_png(fig / f"fig2_{layer}.png", (120, 80))
    for unit in (2, 3, 7):
        write_png(fig / "units" / "conv5" / f"unit_{unit:04d}.png", (90, 40), (10 * unit, 100, 200))
    write_png(fig / "units" / "conv1" / "unit_0000.png", (90, 40))
    write_png(fig / "fig4_conv5.png", (160, 60), (30, 160, 60))
    for unit in (2, 3):
        write_png(fig / "evolution" / "conv5" / f"unit_{unit:04d}.png", (150, 30), (30, 160, 60))
    (fig / "fig4.json").write_text(json.dumps({"conv5": {"epochs": [1, 2, 3], "units": [2, 3]}}))
    write_png(fig / "fig6.png", (100, 50), (90, 90, 90))
    write_png(fig / "fig7.png", (100, 50), (250, 200, 0))
    (fig / "table1.txt").write_text("| region | Delta conv5 |\n|---|---|\n| left_eye | 0.0612 +- 0.0040 |\n")
    write_png(root / "probes" / "probes.png", (80, 60), (0, 0, 200))
    (root / "probes" / "probes.md").write_text("| layer | svm |\n|---|---|\n| conv1 | 41.5 |\n| conv5 | 77.7 |\n")
    return root


ODD = "run #1 ?%é"  # a space, a fragment, a query, an escape and non-ASCII: each must be percent-encoded


ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def serving(run_dir):
    """The viewer of ``run_dir`` served by uvicorn on a free port of 127.0.0.1, in a background thread."""
    import uvicorn

    from convscope.viewer import bind, make_app

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(run_dir), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the viewer did not start"
        time.sleep(0.05)
    try:
        yield "127.0.0.1", port
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


class Watched:
    """A page with its console errors, page errors and dialogs recorded."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.errors, self.dialogs = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def images(self):
        return self.page.evaluate("Array.from(document.images).map(i => [i.getAttribute('alt'), i.complete, "
                                  "i.naturalWidth])")


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    scale = b.abs().max().item()
    assert scale > 0, "the reference is all zero: the comparison would prove nothing"
    return (a - b).abs().max().item() <= rel * scale


def activation(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    _, module = cs.resolve_layer(model, layer)
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def captum(model: nn.Module, layer: str, x: torch.Tensor, rule: str, neuron) -> torch.Tensor:
    """Captum seeds with 1: multiply by the activation's value to compare with the paper's seeding."""
    _, module = cs.resolve_layer(model, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grad = CAPTUM[rule](model, module).attribute(x.clone(), neuron_selector=neuron)
    value = activation(model, layer, x)[(slice(None), *((neuron,) if isinstance(neuron, int) else neuron))]
    return grad * value.view(-1, 1, 1, 1)


# The user's model, as a file of their own: batch norm, residual adds, functional ReLUs in the stem and a ReLU
# module that every block calls twice (as torchvision's BasicBlock does).
MODEL_PY = '''
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes=3, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.layer3 = Block(2 * width, 4 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
'''


CLASSES = ["cat", EVIL, "dog & co"]


def assert_picture(path: Path, expected: np.ndarray) -> None:
    """The picture at ``path`` is ``expected`` (uint8 (H, W, 3)): exactly for a PNG, within JPEG's stated error
    for a ``.jpg`` (4 grey levels on average, 13 at the 99th percentile; tests/test_imaging.py)."""
    with Image.open(path) as im:
        got = np.asarray(im.convert("RGB"), np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    error = np.abs(got - expected)
    if path.suffix == ".png":
        assert error.max() == 0
    else:
        assert error.mean() <= 4 and np.percentile(error, 99) <= 13, (error.mean(), np.percentile(error, 99))


def write_png(path: Path, size=(48, 32), color=(200, 60, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


CAPTUM = {
    "deconvnet": captum_attr.NeuronDeconvolution,
    "guided": captum_attr.NeuronGuidedBackprop,
    "gradient": captum_attr.NeuronGradient,
}


def write_concepts(data, folder, names) -> None:
    """The embedded images' rendered concepts as a user's --masks folder: <concept>/<image>.png (white where the
    concept is), written where the image has the concept, and categories.json."""
    import json

    import numpy as np
    from PIL import Image

    from convscope.data.synthetic import CONCEPTS, concept_maps

    maps = concept_maps(data.truth.scenes, data.image_size).numpy()
    categories = {}
    for j, (category, members) in enumerate(CONCEPTS.items()):
        for k, concept in enumerate(members):
            for i, name in enumerate(names):
                mask = maps[i, j] == k + 1
                if mask.any():
                    (folder / concept / name).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / concept / name)
                    categories[concept] = category
    (folder / "categories.json").write_text(json.dumps(categories))
