"""Fig. 2 unit views: projections and patches cropped to the receptive field of each top-k activation."""

from pathlib import Path

import numpy as np
import pytest
import torch

import convscope as cs
from convscope.data import ImageSet
from convscope.layout import Layout
from convscope.topk import load_topk, scan
from convscope.units import ScanResult, write_scan
from convscope.views import layer_grid, patch_grid, projection_grid, select_units, unit_tile, unit_views


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = cs.create_model("zfnet_small", 4)
    images = (torch.rand(24, 3, 64, 64) * 255).to(torch.uint8)
    data = ImageSet(images, torch.arange(24) % 4, ["a", "b", "c", "d"])
    return model, data, scan(model, data, ["conv2", "conv5", "fc6"], k=9, batch_size=8, progress=False)


def test_crops_are_the_projection_and_the_image_inside_the_receptive_field(setup):
    model, data, topk = setup
    units = torch.tensor([3, 40])
    v = unit_views(model, data, topk, "conv2", units)
    assert v.projections.shape[:2] == (2, 9) and v.patches.shape == v.projections.shape
    # zfnet_small's conv2 field: 7 (conv1) + 2 x 2 (pool, stride 2) + 4 x 4 (conv2 5x5 on stride 4) = 27 px,
    # whatever positions the scan happened to pick (the canvas must not change between units or epochs)
    assert v.projections.shape[-2:] == (27, 27)
    proj = cs.Projector(model)
    for u, unit in enumerate(units.tolist()):
        for j in (0, 4, 8):
            i = int(topk.images["conv2"][unit, j])
            r, c = topk.positions["conv2"][unit, j].tolist()
            box = cs.receptive_field(model, "conv2", (r, c))
            assert v.boxes[u, j].tolist() == list(box)
            image = data.batch(torch.tensor([i]))[0]
            full = proj.project(image, "conv2", channel=unit, position=(r, c))[0]
            crop_h, crop_w = box.y1 - box.y0, box.x1 - box.x0
            placed = v.projections[u, j]
            top = placed.shape[1] - crop_h if (box.y0 == 0 and box.y1 < 64) else 0
            left = placed.shape[2] - crop_w if (box.x0 == 0 and box.x1 < 64) else 0
            torch.testing.assert_close(placed[:, top:top + crop_h, left:left + crop_w],
                                       full[:, box.y0:box.y1, box.x0:box.x1], rtol=1e-4, atol=1e-6)
            assert torch.equal(v.patches[u, j][:, top:top + crop_h, left:left + crop_w],
                               image[0, :, box.y0:box.y1, box.x0:box.x1])
            # the projection vanishes outside the receptive field: the crop holds all of it
            assert full.abs().sum() == pytest.approx(full[:, box.y0:box.y1, box.x0:box.x1].abs().sum().item(),
                                                      rel=1e-6)


def _result(model, data, topk, units, rules=("deconvnet",), calls=None):
    def draw(layer, which, rule):
        if calls is not None:
            calls.append((layer, which.tolist(), rule))
        return unit_views(model, data, topk, layer, which, rule=rule)

    return ScanResult(topk, "val", {"conv5": torch.tensor(units)}, list(rules), "error",
                      {"split": "val", "rules": list(rules)}, draw)


def test_pictures_and_files(setup, tmp_path):
    model, data, topk = setup
    v = unit_views(model, data, topk, "conv5", [0, 1, 2])
    tile = unit_tile(v, 0)
    assert tile.dtype == np.uint8 and tile.shape[1] > tile.shape[0]  # projections | patches side by side
    grid = layer_grid(v, ncol=2)
    assert grid.shape[0] > tile.shape[0] and grid.shape[1] > 2 * tile.shape[1]
    layout = Layout(tmp_path)
    paths = write_scan(_result(model, data, topk, [0, 1, 2], ("deconvnet", "guided")), layout, ncol=2)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "scan/topk.safetensors", "figures/fig2_conv5.png",
        *(f"figures/units/conv5/{f}unit_000{u}.jpg" for u in range(3) for f in ("", "guided/", "patches/", "thumb/"))]
    from helpers import assert_picture
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(paths[1])), grid)
    assert_picture(layout.unit("conv5", 0), projection_grid(v, 0))
    assert_picture(layout.unit_patches("conv5", 0), patch_grid(v, 0))
    guided = unit_views(model, data, topk, "conv5", [0, 1, 2], rule="guided")
    assert_picture(layout.unit("conv5", 2, "guided"), projection_grid(guided, 2))
    assert not np.array_equal(projection_grid(guided, 2), projection_grid(v, 2))
    saved, meta = load_topk(paths[0])
    assert meta["split"] == "val" and meta["rules"] == ["deconvnet", "guided"]
    assert torch.equal(saved.images["conv5"], topk.images["conv5"])


def test_a_killed_drawing_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
    """Units are drawn a chunk at a time and recorded: started again, the write draws only what was missing, and
    the files are those of an uninterrupted write. A record left by another scan is not trusted."""
    import convscope.units as units_module

    model, data, topk = setup
    monkeypatch.setattr(units_module, "CHUNK", 2)
    whole = tmp_path / "whole"
    write_scan(_result(model, data, topk, [0, 1, 2, 3, 4]), Layout(whole))

    calls = []

    def killed(layer, which, rule):
        if calls:
            raise KeyboardInterrupt  # as a kill after the first chunk
        calls.append(which.tolist())
        return unit_views(model, data, topk, layer, which, rule=rule)

    layout = Layout(tmp_path / "killed")
    broken = _result(model, data, topk, [0, 1, 2, 3, 4])
    broken.draw = killed
    with pytest.raises(KeyboardInterrupt):
        write_scan(broken, layout)
    assert calls == [[0, 1]] and layout.unit("conv5", 1).is_file() and not layout.unit("conv5", 2).is_file()
    again = []
    write_scan(_result(model, data, topk, [0, 1, 2, 3, 4], calls=again), layout)
    # the chunks 2-3 and 4; the panel's units (all five) came from the chunks drawn now or are drawn once more
    assert again[:2] == [("conv5", [2, 3], "deconvnet"), ("conv5", [4], "deconvnet")]
    assert again[2:] == [("conv5", [0, 1], "deconvnet")]
    for u in range(5):
        assert layout.unit("conv5", u).read_bytes() == Layout(whole).unit("conv5", u).read_bytes()
    assert layout.layer_figure("fig2", "conv5").read_bytes() == Layout(whole).layer_figure("fig2", "conv5").read_bytes()
    other = []
    other_scan = _result(model, data, topk, [0, 1, 2, 3, 4], calls=other)
    other_scan.identity = {"split": "test", "rules": ["deconvnet"]}
    write_scan(other_scan, layout)
    assert [c[1] for c in other[:3]] == [[0, 1], [2, 3], [4]]  # another scan's record: everything drawn again


def test_units_subset_and_bad_input(setup):
    model, data, topk = setup
    assert select_units(10, None).tolist() == list(range(10))
    sub = select_units(64, 5, seed=1)
    assert len(sub) == 5 and sub.tolist() == sorted(sub.tolist()) and torch.equal(sub, select_units(64, 5, seed=1))
    with pytest.raises(cs.ConvscopeError, match="no spatial map"):
        unit_views(model, data, topk, "fc6", [0])
    with pytest.raises(cs.ConvscopeError, match="scanned layers: conv2, conv5, fc6"):
        unit_views(model, data, topk, "conv1", [0])


def test_crops_are_exact_and_fall_back_to_whole_images_where_they_are_not(setup):
    """Units are projected from crops of their receptive fields, batched: the same projections as from whole
    images. The built-in net's per-pixel mean is told where each crop sits (Normalize.cropped); a model that
    cannot be told (here: the same net with that hook taken away, so a crop sees the wrong mean) fails the check
    of the unit's activation, and every projection is made from the whole image instead."""
    model, data, _ = setup
    g = torch.Generator().manual_seed(3)
    model.normalize.mean.copy_(torch.rand(3, 64, 64, generator=g))
    try:
        topk = scan(model, data, ["conv2"], k=9, batch_size=8, progress=False)
        units = torch.arange(0, 64, 9)
        cropped = unit_views(model, data, topk, "conv2", units)
        assert cropped.cropped == len(units) * 9  # every projection from a crop of 27 + 3 px
        model.normalize.cropped = None  # no longer callable: the crops are not told where they sit
        whole = unit_views(model, data, topk, "conv2", units)
        assert whole.cropped == 0
        torch.testing.assert_close(cropped.projections, whole.projections, rtol=1e-4, atol=1e-6)
        assert torch.equal(cropped.patches, whole.patches) and torch.equal(cropped.boxes, whole.boxes)
        proj = cs.Projector(model)
        for u, unit in enumerate(units.tolist()[:3]):
            i, (r, c) = int(topk.images["conv2"][unit, 0]), topk.positions["conv2"][unit, 0].tolist()
            full = proj.project(data.batch(torch.tensor([i]))[0], "conv2", channel=unit, position=(r, c))[0]
            b = whole.boxes[u, 0].tolist()
            crop = full[:, b[0]:b[2], b[1]:b[3]]
            top = 27 - crop.shape[1] if b[0] == 0 else 0
            left = 27 - crop.shape[2] if b[1] == 0 else 0
            torch.testing.assert_close(cropped.projections[u, 0][:, top:top + crop.shape[1], left:left + crop.shape[2]],
                                       crop, rtol=1e-4, atol=1e-6)
    finally:
        model.normalize.__dict__.pop("cropped", None)
        model.normalize.mean.zero_()


def test_a_tiny_memory_budget_draws_the_same_pictures(setup, tmp_path):
    """Under --max-memory 1M every batch holds one image and every chunk one unit (under the default, batches of
    many), and the projections and the pictures are those drawn without it."""
    from convscope.views import chunk_units

    model, data, topk = setup
    sizes = []
    hook = model.features.conv1.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        free = unit_views(model, data, topk, "conv5", [0, 1, 2, 3])
        big = max(sizes)
        sizes.clear()
        tight = unit_views(model, data, topk, "conv5", [0, 1, 2, 3], max_memory="1M")
    finally:
        hook.remove()
    assert big > 1 and max(sizes) == 1
    assert chunk_units(model, data, "conv5", 9, "1M") == 1 and chunk_units(model, data, "conv5", 9) >= 32
    torch.testing.assert_close(tight.projections, free.projections, rtol=1e-5, atol=1e-7)
    for u in range(4):
        assert np.abs(projection_grid(tight, u).astype(int) - projection_grid(free, u)).max() <= 1
        assert np.array_equal(patch_grid(tight, u), patch_grid(free, u))
    one, many = Layout(tmp_path / "one"), Layout(tmp_path / "many")
    calls = []
    result = _result(model, data, topk, [0, 1, 2, 3], calls=calls)
    result.chunk = lambda layer: chunk_units(model, data, layer, 9, "1M")  # one unit at a time
    write_scan(result, one)
    write_scan(_result(model, data, topk, [0, 1, 2, 3]), many)
    assert [c[1] for c in calls[:4]] == [[0], [1], [2], [3]]
    for u in range(4):  # the same pictures (a grey level moved by the last float bits, spread a little by JPEG)
        assert one.unit_patches("conv5", u).read_bytes() == many.unit_patches("conv5", u).read_bytes()
        for a, b in ((one.unit("conv5", u), many.unit("conv5", u)), (one.unit_thumb("conv5", u),
                                                                      many.unit_thumb("conv5", u))):
            diff = np.abs(pixels(a).astype(int) - pixels(b))
            assert (diff > 0).mean() < 0.01 and diff.max() <= 8, ((diff > 0).mean(), diff.max())


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_units_that_rank_the_same_image_share_its_forward_pass(setup):
    """Eight units of conv5 over 24 images rank many of the same images: drawn together, each image (with its
    crop) goes through the model once for all the units that rank it, and every projection is the one the unit
    gets drawn alone."""
    model, data, topk = setup
    pushed = []
    hook = model.features.conv1.register_forward_pre_hook(
        lambda m, args: pushed.append(args[0].shape[0] * args[0].shape[-2] * args[0].shape[-1] / 64 ** 2))
    try:
        together = unit_views(model, data, topk, "conv5", list(range(8)))
        shared = sum(pushed)
        pushed.clear()
        alone = [unit_views(model, data, topk, "conv5", [u]) for u in range(8)]
        separate = sum(pushed)
    finally:
        hook.remove()
    images = topk.images["conv5"][:8]
    assert len(torch.unique(images)) < images.numel()  # the units do share images
    assert shared < separate
    for u in range(8):
        torch.testing.assert_close(together.projections[u], alone[u].projections[0], rtol=1e-4, atol=1e-6)
        assert torch.equal(together.patches[u], alone[u].patches[0])


def test_max_memory_is_read_as_an_amount_or_refused_with_the_forms_it_takes(monkeypatch):
    from convscope.errors import ConvscopeError
    from convscope.memory import budget, machine, parse

    assert parse("4G") == 4 << 30 and parse("512M") == 512 << 20 and parse("1.5GB") == int(1.5 * (1 << 30))
    assert parse("2GiB") == 2 << 30 and parse(3 << 20) == 3 << 20 and budget("1M") == 1 << 20
    assert budget() == int(machine() / 4)  # a quarter of this machine's, shared by torchrun's processes here
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert budget() == int(machine() / 16) and budget("2G") == 2 << 30
    for bad in ("lots", "4X", "-1G", "0.5K"):
        with pytest.raises(ConvscopeError, match="max-memory"):
            parse(bad)
