"""Fig. 2 unit views: projections and patches cropped to the receptive field of each top-k activation."""

import numpy as np
import pytest
import torch

import convscope as cs
from convscope.data import ImageSet
from convscope.layout import Layout
from convscope.topk import load_topk, scan
from convscope.units import ScanResult, layer_grid, select_units, unit_tile, unit_views, write_scan


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


def test_pictures_and_files(setup, tmp_path):
    model, data, topk = setup
    v = unit_views(model, data, topk, "conv5", [0, 1, 2])
    tile = unit_tile(v, 0)
    assert tile.dtype == np.uint8 and tile.shape[1] > tile.shape[0]  # projections | patches side by side
    grid = layer_grid(v, ncol=2)
    assert grid.shape[0] > tile.shape[0] and grid.shape[1] > 2 * tile.shape[1]
    paths = write_scan(ScanResult(topk, "val", {"conv5": v}, "deconvnet", "error"), Layout(tmp_path), ncol=2)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "scan/topk.safetensors", "figures/fig2_conv5.png", "figures/units/conv5/unit_0000.png",
        "figures/units/conv5/unit_0001.png", "figures/units/conv5/unit_0002.png"]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(paths[1])), grid)
    assert np.array_equal(np.asarray(Image.open(paths[2])), tile)
    saved, meta = load_topk(paths[0])
    assert meta["split"] == "val" and torch.equal(saved.images["conv5"], topk.images["conv5"])


def test_units_subset_and_bad_input(setup):
    model, data, topk = setup
    assert select_units(10, None).tolist() == list(range(10))
    sub = select_units(64, 5, seed=1)
    assert len(sub) == 5 and sub.tolist() == sorted(sub.tolist()) and torch.equal(sub, select_units(64, 5, seed=1))
    with pytest.raises(cs.ConvscopeError, match="no spatial map"):
        unit_views(model, data, topk, "fc6", [0])
    with pytest.raises(cs.ConvscopeError, match="scanned layers: conv2, conv5, fc6"):
        unit_views(model, data, topk, "conv1", [0])
