"""Data at scale and the device: an ImageFolder decoded by DataLoader worker processes (--workers) gives the same
images, scan and training as one decoded in this process; a device this machine lacks is refused before anything
is read or written; on a machine with a GPU, the scan there equals the CPU's."""

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import convscope as cs
from convscope.cli import main
from convscope.config import TrainConfig
from convscope.data import DataSpec, Splits
from convscope.data.folder import FolderDataset, load_folder
from convscope.data.loader import batches
from convscope.data.synthetic import load_synthetic
from convscope.errors import ConvscopeError
from convscope.topk import load_topk, scan
from convscope.train import train

TINY = {"widths": [8, 8, 12, 12, 8], "fc": [16, 16]}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """An ImageFolder of 60 JPEGs of several sizes (3 classes of the embedded data, upscaled to 80..120 px) and
    one file that is not an image (named .jpg): decoding costs, as on a real tree."""
    root = tmp_path_factory.mktemp("jpegs") / "images"
    data = load_synthetic("test", n=60, classes=["face", "car", "house"])
    for i in range(len(data)):
        folder = root / data.classes[int(data.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        side = 80 + 20 * (i % 3)
        Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).resize((side + 10 * (i % 2), side)).save(
            folder / f"{i:03d}.jpg", quality=90)
    return root


def _loud_tree(tmp_path):
    """Two classes of four PNGs and a broken .jpg in the second."""
    g = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(g.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return tmp_path


def test_workers_decode_the_same_images_in_the_same_order_and_report_the_same_bad_file(tmp_path):
    root = _loud_tree(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .*broken\.jpg") as w0:
        here = load_folder(root, size=16)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .*broken\.jpg") as w2:
        there = load_folder(root, size=16, workers=2)
    assert str(w0[0].message) == str(w2[0].message)
    assert torch.equal(here.images, there.images) and torch.equal(here.labels, there.labels)
    assert here.sources == there.sources and len(here) == 8

    lazy = FolderDataset(root, size=16)
    chunks = [torch.tensor([0, 1, 2]), torch.tensor([7, 3]), torch.tensor([5])]
    got = list(batches(lazy, chunks, workers=2))
    for chunk, (x, y) in zip(chunks, got):
        want = torch.stack([lazy[int(i)][0] for i in chunk])
        assert torch.equal(x, want) and y.tolist() == [lazy.targets[int(i)] for i in chunk]
    bad = lazy.sources.index(str(root / "b" / "broken.jpg"))
    with pytest.raises(ConvscopeError, match=r"cannot read image .*broken\.jpg"):  # raised here, not a traceback
        list(batches(lazy, [torch.tensor([0]), torch.tensor([bad]), torch.tensor([1])], workers=2))


def test_a_lazy_split_is_the_in_memory_split(jpegs):
    spec = DataSpec("folder", str(jpegs), 48)
    for split in ("train", "val", "all"):
        mem, lazy = spec.load(split), spec.load(split, workers=2, lazy=True)
        assert isinstance(lazy, FolderDataset) and lazy.sources == mem.sources and len(lazy) == len(mem)
        x, y = lazy.batch(torch.arange(len(lazy)))
        assert torch.equal(x, mem.batch(torch.arange(len(mem)))[0]) and torch.equal(y, mem.labels)
    sub = spec.load("train", lazy=True).subset([3, 0])
    assert sub.sources == [spec.load("train").sources[i] for i in (3, 0)]


def test_scan_of_a_lazy_folder_with_workers_equals_the_in_memory_scan(jpegs):
    spec = DataSpec("folder", str(jpegs), 64)
    mem, lazy = spec.load("all"), spec.load("all", lazy=True)
    model = cs.create_model("zfnet_small", 3, **TINY).eval()
    want = scan(model, mem, ["conv2", "conv5"], k=4, batch_size=16, class_k=3, progress=False)
    got = scan(model, lazy, ["conv2", "conv5"], k=4, batch_size=16, class_k=3, progress=False, workers=2)
    for layer in ("conv2", "conv5"):
        assert torch.equal(got.values[layer], want.values[layer])
        assert torch.equal(got.images[layer], want.images[layer])
        assert torch.equal(got.positions[layer], want.positions[layer])
        assert torch.equal(got.class_images[layer], want.class_images[layer])
    assert got.seen == want.seen == len(mem)


def test_training_on_a_lazy_folder_with_workers_equals_training_in_memory(jpegs, tmp_path):
    """The same seeded order, augmentation and dropout: bit-identical weights and metrics, decoded by 2 workers
    (whose DataLoader draws its seeds from a generator of its own, not the global one that seeds dropout)."""
    cfg = TrainConfig(model="zfnet_small", data="folder", data_root=str(jpegs), image_size=64, epochs=2,
                      batch_size=16, model_options=TINY, save_epochs=(1,))
    spec = cfg.data_spec()
    mem = Splits(*(spec.load(s) for s in ("train", "val", "test")))
    lazy = Splits(*(spec.load(s, lazy=True) for s in ("train", "val", "test")))
    a = train(cfg, tmp_path / "mem", splits=mem, progress=False)
    b = train(cfg, tmp_path / "lazy", splits=lazy, progress=False, workers=2)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    for m, n in zip(a.metrics, b.metrics):
        for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err"):
            assert m[key] == n[key], key
    assert a.test == b.test


def test_scan_command_with_workers_on_an_attached_folder(jpegs, tmp_path):
    run = tmp_path / "attached"
    r = CliRunner().invoke(main, ["attach", "--model", "zfnet_small", "--model-arg", "widths=[8,8,12,12,8]",
                                  "--model-arg", "fc=[16,16]", "--data", "folder", "--data-root", str(jpegs),
                                  "--image-size", "64", "--out", str(run)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["scan", str(run), "--units", "2", "--workers", "2", "--class-k", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, meta = load_topk(run / "scan" / "topk.safetensors")
    assert meta["world_size"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opened = cs.open_run(run)
    want = scan(opened.model, opened.split("all"), got.layers, k=9, progress=False)
    for layer in got.layers:
        assert torch.equal(got.values[layer], want.values[layer])
        assert torch.equal(got.images[layer], want.images[layer])


def test_a_device_this_machine_lacks_is_refused_before_anything_is_read_or_written(trained_run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = sorted(p.relative_to(trained_run.path) for p in trained_run.path.rglob("*"))
    for device, says in (("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("tpu", "unknown device 'tpu'; valid "
                                                                                       "devices: auto, cpu, cuda")):
        r = CliRunner().invoke(main, ["scan", str(trained_run.path), "--device", device])
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
    assert "--device cpu" in r.output or "valid devices" in r.output
    r = CliRunner().invoke(main, ["train", "--epochs", "1", "--device", "cuda", "--out", str(tmp_path / "new")])
    assert r.exit_code == 2 and "no CUDA GPU" in r.output and not (tmp_path / "new").exists(), r.output
    assert sorted(p.relative_to(trained_run.path) for p in trained_run.path.rglob("*")) == before
    with pytest.raises(ConvscopeError, match="workers must be a whole number from 0"):
        cs.open_run(trained_run.path, workers=-1)


def test_the_model_on_the_cpu_device_takes_inputs_and_passes_gradients(trained_run):
    """``--device cpu`` goes through the same hook as a GPU: the inputs follow the model, gradients reach them."""
    run = cs.open_run(trained_run.path, device="cpu")
    x = trained_run.split("test").batch(torch.arange(2))[0].requires_grad_(True)
    run.model(x).sum().backward()
    assert run.device.type == "cpu" and x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(run.model(x.detach()), trained_run.model(x.detach()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scan_and_projections_on_the_gpu_equal_the_cpus(trained_run):
    from convscope.deconvnet import Projector
    from convscope.forward import exact_float32

    gpu = cs.open_run(trained_run.path, device="cuda")
    data = trained_run.split("test").subset(torch.arange(200))
    want = scan(trained_run.model, data, ["conv1", "conv5"], k=9, progress=False)
    got = scan(gpu.model, data, ["conv1", "conv5"], k=9, progress=False)
    for layer in ("conv1", "conv5"):  # in IEEE float32 (TF32 off during the scan): equal to rounding
        torch.testing.assert_close(got.values[layer], want.values[layer], rtol=1e-4, atol=1e-5)
    x = data.batch(torch.arange(4))[0]
    a = Projector(trained_run.model).project(x, "conv5")
    with exact_float32():
        b = Projector(gpu.model).project(x, "conv5")
    torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4)
    assert torch.backends.cudnn.allow_tf32  # PyTorch's default is back after each scan
