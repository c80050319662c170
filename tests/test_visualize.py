"""Feature visualisation by optimisation (Olah et al. 2017, Lucid's recipe): the optimised image excites its unit
more than the best of the data set's images, the same seed gives the same image bit for bit, the Fourier and
colour parameterisation does what Lucid's does, and bad options are refused before anything is optimised."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import random_imageset

import convscope as cs
from convscope import visualize
from convscope.errors import ConvscopeError
from convscope.topk import scan_shard


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """An untrained, seeded zfnet_small (conv1 32 maps .. conv5 64) attached to 12 random images: the fast tests'
    run (the trained one costs minutes the first time)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cs.create_model("zfnet_small", 3)
    return cs.attach(model, random_imageset([0, 1, 2] * 4), tmp_path_factory.mktemp("visualize") / "run")


@pytest.mark.slow
def test_optimised_images_excite_their_units_beyond_the_best_data_set_image(trained_run, measured):
    """conv5 of the trained zfnet_small, 8 seeded units, 256 steps (the default), the "neuron" objective (the
    unit at the centre of its map, as the scan measures one position): each unit's strongest activation in its
    optimised image against its strongest over the 1000 validation images. Measured over training seeds 0-2
    (scripts/seeds.py): the smallest ratio 2.0-4.2, the median 4.5-5.1. The "channel"
    objective (the mean over the map, a texture) reached 0.55..3.28 on the same units: a texture spreads what one
    position could have. Over 16 units: conv3 median 6.4, conv1 1.2 (a 7x7 filter on pixels in [0, 1] has little
    headroom over the data's saturated images)."""
    result = visualize.compute(trained_run, layers=["conv5"], units=8, seed=0)
    vis = result.layers["conv5"]
    data = trained_run.split("val")
    top = scan_shard(trained_run.model, data, torch.arange(len(data)), ["conv5"], k=1).values["conv5"][:, 0]
    ratios = vis.activations / top[vis.units]
    print("conv5 units", vis.units.tolist(), "ratios", [round(r, 2) for r in ratios.tolist()],
          f"{vis.seconds:.1f} s")
    measured("visualize.conv5.min_ratio", ratios.min())
    measured("visualize.conv5.median_ratio", ratios.median())
    assert vis.images.shape == (8, 3, 64, 64) and result.steps == 256
    assert (ratios > 1.5).all() and ratios.median() > 3


def test_same_seed_same_image_bit_for_bit_and_the_model_left_as_it_was(small_run):
    model = copy.deepcopy(small_run.model).train()
    model.features.conv1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    a = visualize.visualize_units(model, "conv3", [5, 9], 64, steps=12, seed=3)
    b = visualize.visualize_units(model, "conv3", [5, 9], 64, steps=12, seed=3)
    c = visualize.visualize_units(model, "conv3", [5, 9], 64, steps=12, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.activations, b.activations)
    assert (a.images - c.images).abs().max() > 0.01
    assert a.images.shape == (2, 3, 64, 64) and 0 <= a.images.min() and a.images.max() <= 1
    # eval mode while optimising, the model's own mode back; no gradient reached its parameters
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_fourier_start_is_grey_and_the_colour_round_trip_is_lucids():
    g = torch.Generator().manual_seed(0)
    image = visualize.spectrum_to_image(visualize.init_spectrum(5, 48, g), 48)
    assert image.shape == (5, 3, 48, 48) and 0.4 < image.min() and image.max() < 0.6  # sigmoid(small): grey
    # 1/frequency: the DC term at its cap, 1/(1/48); the highest frequency (0.5, 0.5) at 1/sqrt(0.5)
    scale = visualize.spectrum_scale(48, 48)
    assert scale.shape == (48, 25) and scale[0, 0] == 48 and scale[24, 24] == pytest.approx(math.sqrt(2))
    # Lucid's matrix over its largest column norm, sqrt(0.26^2 + 0.27^2 + 0.27^2) = 0.46195: the luminance
    # column becomes a unit vector, a near grey (0.5628, 0.5845, 0.5845)
    m = visualize.color_matrix()
    assert m.norm(dim=0).max() == pytest.approx(1)
    assert m[:, 0].tolist() == pytest.approx([0.26 / 0.46195, 0.27 / 0.46195, 0.27 / 0.46195], abs=1e-4)
    # a DC coefficient c in the luminance channel: the ortho inverse FFT gives c * 48 / 48, Lucid divides by 4,
    # so a flat image of sigmoid(m[:, 0] * c / 4); c = 4 gives sigmoid(0.5628) = 0.6371, sigmoid(0.5845) = 0.6421
    spectrum = torch.zeros(1, 3, 48, 25, 2, dtype=torch.float64)
    spectrum[0, 0, 0, 0, 0] = 4.0
    flat = visualize.spectrum_to_image(spectrum, 48)[0]
    assert flat.amax((1, 2)).tolist() == pytest.approx([0.6371, 0.6421, 0.6421], abs=1e-4)
    assert torch.allclose(flat.amin((1, 2)), flat.amax((1, 2)))
    # and back: logit, then the matrix's inverse, recovers the decorrelated value c / 4 = 1 in channel 0 alone
    back = torch.linalg.solve(m, torch.logit(flat[:, 0, 0]))
    assert back.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)


def test_random_transform_is_seeded_and_pads_by_12_grey_pixels():
    x = torch.rand(3, 3, 40, 40)
    a = visualize.random_transform(x, torch.Generator().manual_seed(1))
    b = visualize.random_transform(x, torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 64, 64) and torch.equal(a, b)
    # the middle of the top row is padding whatever the draw: 32 px above the centre, at most 32 / 0.9 and at
    # least 32 / 1.1 cos 10 - 4 sin 10 - 6 = 21.9 px in the input, beyond the image's 20 (+ 1 for bilinear)
    assert a[..., 0, 28:36].sub(0.5).abs().max() < 1e-6


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps must be a whole number from 1 to 10000, got 0"),
    ({"steps": 10001}, "steps must be a whole number from 1 to 10000"),
    ({"layers": ["conv9"]}, "unknown layer 'conv9'; valid layers: conv1, conv2"),
    ({"layers": ["conv1"], "units": 33}, "units 33: layer 'conv1' has only 32 units; ask for at most 32, or 0"),
    ({"units": -1}, "units (0 for all) must be a whole number from 0"),
    ({"seed": -1}, "seed must be a whole number from 0"),
])
def test_bad_options_are_refused_with_a_clear_message(small_run, options, message):
    with pytest.raises(ConvscopeError, match=f"^{message.replace('(', '.').replace(')', '.')}"):
        visualize.compute(small_run, **options)


def test_a_unit_beyond_the_layer_is_refused_from_python_too(small_run):
    with pytest.raises(ConvscopeError, match=r"unit 64 out of range: layer 'conv5' has 64 units \(0\.\.63\)"):
        visualize.visualize_units(small_run.model, "conv5", [3, 64], 64, steps=1)
    with pytest.raises(ConvscopeError, match="no units named"):
        visualize.visualize_units(small_run.model, "conv5", [], 64, steps=1)
