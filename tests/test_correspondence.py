"""Correspondence (paper Table 1): Delta by hand, a model whose layer is the image itself, the embedded faces,
one's own images from a JSON file, the writer, bad input, and on a trained net: parts beat random regions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convscope.correspondence import (
    RANDOM,
    PartImages,
    class_parts,
    correspondence,
    correspondence_table,
    delta,
    load_parts_json,
    mask_squares,
    write_correspondence,
)
from convscope.data.synthetic import load_synthetic
from convscope.errors import ConvscopeError
from convscope.layout import Layout


class PixelNet(nn.Module):
    """Layers ``pixels`` (the image itself) and ``out``; eps is then the image minus its masked copy."""

    def __init__(self):
        super().__init__()
        self.pixels = nn.Identity()
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))

    def forward(self, x):
        return self.out(self.pixels(x))


def test_delta_by_hand():
    eps = torch.tensor([[1.0, -1, 0, 2], [1, 1, 0, -3], [-1, -1, 0, 1]])
    # sign Hamming distances: (0,1) 2, (0,2) 1, (1,2) 3; ordered pairs 12 / (3 * 2 pairs * 4 values)
    assert delta(eps) == pytest.approx(0.5)
    assert delta(eps[[0, 0, 0]] * torch.tensor([[1.0], [2], [3]])) == 0.0
    with pytest.raises(ConvscopeError, match="at least 2"):
        delta(eps[:1])


def test_mask_squares_centred_and_clipped():
    out = mask_squares(torch.ones(2, 1, 6, 6), torch.tensor([[4.5, 3.0], [0.2, 0.2]]), 3, torch.tensor([0.0]))
    assert out[0, 0, 1:4, 3:6].sum() == 0 and out[0, 0].sum() == 36 - 9  # x 3..5, y 1..3
    assert out[1, 0, 0, 0] == 0 and out[1, 0].sum() == 36 - 1  # from floor(-1.3) = -2: clipped to 1x1


def parts_data(n: int, xy: list[tuple[float, float]]) -> PartImages:
    # Every pixel above the fill (0.5): masking makes eps positive exactly inside the square.
    g = torch.Generator().manual_seed(0)
    images = 0.6 + 0.4 * torch.rand(1, 3, 16, 16, generator=g).expand(n, -1, -1, -1)
    spot = torch.tensor(xy, dtype=torch.float32)
    return PartImages(images.clone(), {"spot": spot, "same": torch.full((n, 2), 8.0),
                                       "gone": torch.full((n, 2), float("nan"))})


def test_same_part_in_identical_images_agrees_exactly():
    data = parts_data(4, [(3, 3), (12, 12), (3, 12), (12, 3)])
    r = correspondence(PixelNet(), data, parts=["same", "spot"], layers=["pixels"], size=4, n_images=4, draws=3,
                       fill=0.5)
    assert r.regions == ("same", "spot", RANDOM)
    assert r.values["same"]["pixels"].tolist() == [0.0, 0.0, 0.0]
    # four disjoint 4x4 squares: any two images differ on 2 * 16 pixels * 3 channels out of 768 values
    assert r.values["spot"]["pixels"].tolist() == pytest.approx([96 / 768] * 3)
    assert r.std["spot"]["pixels"] == pytest.approx(0.0)
    assert 0 < r.mean[RANDOM]["pixels"] <= 96 / 768 + 1e-9
    again = correspondence(PixelNet(), data, parts=["same", "spot"], layers=["pixels"], size=4, n_images=4,
                           draws=3, fill=0.5)
    assert torch.equal(again.values[RANDOM]["pixels"], r.values[RANDOM]["pixels"])  # seeded


def test_random_regions_stay_in_the_box():
    data = parts_data(5, [(8, 8)] * 5)
    data.boxes = torch.tensor([[4.0, 4, 12, 12]]).expand(5, 4)
    r = correspondence(PixelNet(), data, parts=["same"], layers=["pixels"], size=2, n_images=3, draws=20,
                       fill=0.5)
    # two 2x2 masks whose centres lie in an 8x8 box overlap sometimes: Delta below the disjoint 2 * 4 * 3 / 768
    assert r.values[RANDOM]["pixels"].max() <= 24 / 768 + 1e-9
    assert r.values[RANDOM]["pixels"].min() < 24 / 768


def test_embedded_faces():
    data = load_synthetic("test", n=48)
    faces = class_parts(data, "face")
    assert len(faces.images) == 4 and set(faces.parts) == {"head", "left_eye", "right_eye", "nose", "mouth"}
    assert torch.equal(faces.images[1], data[12][0]) and torch.equal(faces.boxes[1], data.truth.boxes[12])
    with pytest.raises(ConvscopeError, match="unknown class 'dog'.*face"):
        class_parts(data, "dog")


def test_own_images_from_json(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 10, 3), dtype=np.uint8) for _ in range(3)]
    for k, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"im{k}.png")
    spec = {"images": ["im0.png", "im1.png", "im2.png"],
            "parts": {"nose": [[5, 10], [4, 9], [6, 11]], "tail": [[1, 1], None, [2, 2]]}}
    (tmp_path / "parts.json").write_text(json.dumps(spec))
    data = load_parts_json(tmp_path / "parts.json")
    assert data.images.shape == (3, 3, 20, 10) and data.boxes is None
    assert torch.equal(data.images[1], torch.from_numpy(arrays[1]).permute(2, 0, 1).float() / 255)
    assert data.parts["nose"][2].tolist() == [6, 11] and torch.isnan(data.parts["tail"][1]).all()
    resized = load_parts_json(tmp_path / "parts.json", size=40)
    assert resized.images.shape == (3, 3, 40, 40) and resized.parts["nose"][0].tolist() == [20, 20]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 20, 10))
    with pytest.raises(ConvscopeError, match=r"unknown part 'tail'; valid parts: nose"):
        correspondence(model, data, parts=["tail"], layers=["1"], n_images=3)
    r = correspondence(model, data, parts=["nose"], layers=["1"], n_images=3, size=4, draws=2)
    assert r.regions == ("nose", RANDOM) and r.values["nose"]["1"].shape == (2,)

    (tmp_path / "bad.json").write_text(json.dumps({"images": ["im0.png"], "parts": {"nose": [[1, 2], [3, 4]]}}))
    with pytest.raises(ConvscopeError, match="one entry per image"):
        load_parts_json(tmp_path / "bad.json")
    with pytest.raises(ConvscopeError, match="does not exist"):
        load_parts_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConvscopeError, match="must look like"):
        load_parts_json(tmp_path / "list.json")


def test_write_correspondence(tmp_path):
    data = parts_data(4, [(3, 3), (12, 12), (3, 12), (12, 3)])
    r = correspondence(PixelNet(), data, parts=["spot"], layers=["pixels", "out"], size=4, n_images=4, draws=2,
                       fill=0.5)
    js, txt = write_correspondence(r, Layout(tmp_path), "table1")
    assert js == tmp_path / "figures" / "table1.json" and txt == tmp_path / "figures" / "table1.txt"
    saved = json.loads(js.read_text())
    assert saved["mean"]["spot"]["pixels"] == pytest.approx(0.125)
    assert saved["values"][RANDOM]["out"] == r.values[RANDOM]["out"].tolist()
    table = txt.read_text()
    assert table == correspondence_table(r) and "spot" in table and "0.1250 +- 0.0000" in table


def test_bad_input():
    data, model = parts_data(4, [(3, 3)] * 4), PixelNet()
    with pytest.raises(ConvscopeError, match=r"unknown part 'wheel'; valid parts: spot, same$"):
        correspondence(model, data, parts=["wheel"], layers=["pixels"])
    with pytest.raises(ConvscopeError, match="unknown part 'gone'"):
        correspondence(model, data, parts=["gone"], layers=["pixels"])
    with pytest.raises(ConvscopeError, match="at least 2 images"):
        correspondence(model, data, parts=["spot"], layers=["pixels"], n_images=1)
    one = PartImages(data.images[:1], {k: v[:1] for k, v in data.parts.items()})
    with pytest.raises(ConvscopeError, match="at least 2 images"):
        correspondence(model, one, parts=["spot"], layers=["pixels"], n_images=1)
    with pytest.raises(ConvscopeError, match="only 4 images were given: choose 2..4"):
        correspondence(model, data, parts=["spot"], layers=["pixels"], n_images=5)
    with pytest.raises(ConvscopeError, match="mask size must be an integer from 1 to 16"):
        correspondence(model, data, parts=["spot"], layers=["pixels"], n_images=4, size=17)
    with pytest.raises(ConvscopeError, match="draws"):
        correspondence(model, data, parts=["spot"], layers=["pixels"], n_images=4, draws=0)


@pytest.mark.slow
def test_trained_net_parts_and_random_regions(trained_zf, measured):
    """Table 1 on the embedded faces. Measured over training seeds 0-2 (scripts/seeds.py; 8 px masks, 20 draws):
    Delta 0.29-0.34 at conv5, parts within 0.002 of random regions there; at fc7 0.22-0.32, the eyes 0.00-0.04
    above random regions (less consistent, not more).
    The paper's gap (eyes 0.067 vs random 0.107) does not appear: every part here takes a random colour per
    image, so masking it moves the features in no consistent direction (the paper's dog eyes are all dark).
    Checked: the values are mean sign changes in a sane band, and no part is less consistent than random."""
    model, data = trained_zf
    r = correspondence(model, class_parts(data, "face"), draws=20, seed=0)
    mean, std = r.mean, r.std
    for region in r.regions:
        for layer in r.layers:
            measured(f"table1.{layer}.{region}", mean[region][layer])
    for region in r.regions:
        assert 0.1 < mean[region]["conv5"] < 0.5 and 0.1 < mean[region]["fc7"] < 0.7
    for part in ("left_eye", "right_eye", "nose"):
        assert mean[part]["conv5"] <= mean[RANDOM]["conv5"] + 2 * std[RANDOM]["conv5"]
