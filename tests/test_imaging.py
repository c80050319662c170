"""imaging: display normalisation of projections (paper Fig. 2 style), PIL round trips, grids."""

from __future__ import annotations

import numpy as np
import torch

from convscope.imaging import make_grid, pil_to_tensor, tensor_to_pil, to_image


def test_zero_maps_to_mid_grey_and_scale_to_the_ends():
    x = torch.zeros(3, 2, 2)
    x[0, 0, 0], x[1, 0, 0], x[2, 0, 0] = 2.0, -2.0, 1.0
    img = to_image(x, percentile=100)
    assert img.shape == (2, 2, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [255, 1, 192]  # 128 + 127 * (1, -1, 0.5), 191.5 rounds to even
    assert (img[1:, :] == 128).all() and (img[0, 1] == 128).all()


def test_dead_projection_is_flat_grey_never_nan():
    img = to_image(torch.zeros(2, 3, 4, 5))
    assert img.shape == (2, 4, 5, 3) and (img == 128).all()


def test_percentile_clips_outliers_per_image():
    x = torch.cat([torch.full((1, 3, 10, 10), 0.5), torch.full((1, 3, 10, 10), -0.5)])
    x[0, 0, 0, 0] = 100.0  # one outlier must not wash out image 0; image 1 is scaled on its own
    img = to_image(x, percentile=99)
    assert img[0, 0, 0, 0] == 255 and img[0, 5, 5, 1] == 255
    assert (img[1] == 1).all()


def test_pil_round_trip():
    t = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1).expand(3, 2, 3)
    back = pil_to_tensor(tensor_to_pil(t))
    assert back.shape == (3, 2, 3) and torch.allclose(back[:, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))


def test_make_grid_places_tiles():
    tiles = [np.full((2, 3, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    grid = make_grid(tiles, nrow=3, pad=1, fill=0)
    assert grid.shape == (1 + 2 * 3, 1 + 3 * 4, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 5, 0] == 20 and grid[1, 9, 0] == 30 and grid[4, 1, 0] == 40
    assert grid[0].max() == 0 and grid[4, 5].max() == 0  # padding, and the empty fifth and sixth cells


def test_a_projection_encoded_for_the_page_is_within_the_stated_error(tmp_path):
    """Projections as the unit pages store them (at display size, rounded to grey levels, JPEG at 4:4:4 and
    quality 95), decoded, against their float grey levels: within 4 grey levels on average and 13 at the 99th
    percentile (of 255; measured 2.1-3.4 and 10.5-11.9), at conv1, conv3 and conv5 of an untrained ZF net, whose
    projections are pixel noise, the hardest case there is; the default JPEG (4:2:0, quality 75) is not, the
    control that the test can fail."""
    from PIL import Image

    import convscope as cs
    from convscope import artifacts
    from convscope.data.synthetic import load_synthetic
    from convscope.imaging import display
    from convscope.topk import scan
    from convscope.views import shown, unit_views

    torch.manual_seed(0)
    model = cs.create_model("zfnet", num_classes=12).eval()
    data = load_synthetic("val", n=12, size=224)
    layers = ["conv1", "conv3", "conv5"]
    topk = scan(model, data, layers, k=9, batch_size=12, progress=False)
    errors, defaults = [], []
    for layer in layers:
        views = unit_views(model, data, topk, layer, [0, 1, 2])
        for floats in display(shown(views.projections.flatten(0, 1))):
            path = artifacts.save_image(tmp_path / "p.jpg", to_image_u8(floats))
            with Image.open(path) as im:
                errors.append((np.asarray(im.convert("RGB"), np.float64) - floats.numpy()).ravel())
            im = Image.fromarray(to_image_u8(floats))
            im.save(tmp_path / "d.jpg")
            with Image.open(tmp_path / "d.jpg") as d:
                defaults.append((np.asarray(d.convert("RGB"), np.float64) - floats.numpy()).ravel())
    error, default = np.abs(np.concatenate(errors)), np.abs(np.concatenate(defaults))
    assert error.mean() <= 4 and np.percentile(error, 99) <= 13, (error.mean(), np.percentile(error, 99))
    assert default.mean() > 4 or np.percentile(default, 99) > 13, (default.mean(), np.percentile(default, 99))


def to_image_u8(floats: torch.Tensor) -> np.ndarray:
    return floats.round().to(torch.uint8).numpy()
