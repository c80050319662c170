"""Sanity checks (Adebayo et al. 2018): cascading randomisation equals Quantus's MPRT to 1e-6, the SSIM equals
scikit-image's, and on the trained net guided backprop barely moves when the top layers are randomised while the
gradient does (the paper's finding, on this model)."""

import numpy as np
import pytest
import torch
from helpers import TINY_ARGS

from convscope import sanity
from convscope.layers import output_layer
from convscope.models import create_model


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("zfnet_small", num_classes=3, **TINY_ARGS).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(4, 3, 64, 64, generator=g), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("method", ["gradient", "guided"])
@pytest.mark.parametrize("absolute", [True, False])
def test_cascading_randomisation_equals_quantus_mprt(tiny, method, absolute):
    import warnings

    import quantus
    model, x, y = tiny

    def explain(m, images, classes):
        return sanity.class_maps(m, images, classes, method, "classifier", 3)

    def quantus_explain(model, inputs, targets, **_):
        return explain(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()

    state = torch.random.get_rng_state()
    names, maps = sanity.mprt(model, x, y, explain)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left as it was
    f = np.abs if absolute else (lambda a: a)
    ours = {n: sanity.spearman(f(maps[0].flatten(1).numpy()), f(m.flatten(1).numpy())) for n, m in zip(names, maps[1:])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.MPRT(layer_order="top_down", seed=42, abs=absolute, normalise=True, return_aggregate=False,
                              disable_warnings=True, display_progressbar=False)
        theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                        explain_func=quantus_explain, device="cpu")
    assert names == [n for n in theirs if n != "original"]
    assert names[:3] == ["classifier.fc8", "classifier.fc7", "classifier.fc6"] and names[-1] == ""
    for n in names:
        np.testing.assert_allclose(ours[n], theirs[n], atol=1e-6, rtol=0)
    assert ours["classifier.fc8"].mean() > ours["features.conv1"].mean()


def test_randomised_copies_leave_the_model_and_independent_resets_the_rest(tiny):
    model, _, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = sanity.randomised(model, "independent", seed=3)
    name, first = next(steps)
    assert name == "classifier.fc8" and not torch.equal(first.classifier.fc8.weight, model.classifier.fc8.weight)
    name, second = next(steps)  # fc7 randomised, fc8 back to the trained weights
    assert name == "classifier.fc7" and torch.equal(second.classifier.fc8.weight, model.classifier.fc8.weight)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(Exception, match="unknown layer order 'sideways'"):
        next(sanity.randomised(model, "sideways"))


def test_ssim_equals_scikit_image():
    from skimage import metrics
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    ours = sanity.ssim(a, b)
    for i in range(2):
        theirs = metrics.structural_similarity(a[i].numpy().astype(np.float64), b[i].numpy().astype(np.float64),
                                               gaussian_weights=True, sigma=1.5, use_sample_covariance=True,
                                               data_range=2.0, channel_axis=0)
        assert ours[i].item() == pytest.approx(theirs, abs=1e-6)
    assert sanity.ssim(a, a).tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.slow
def test_guided_backprop_barely_moves_when_the_top_layers_are_randomised(trained_run, measured):
    """Adebayo et al.'s finding on the trained zfnet_small (measured, 8 test images, Spearman of the absolute
    maps after fc8 / after fc6 / after everything), over training seeds 0-2 (scripts/seeds.py): guided 0.97-1.0 /
    0.95-0.98 / 0.23-0.35, gradient 0.65-0.67 / 0.54-0.65 / 0.13-0.26."""
    data = trained_run.split("test")
    x, y = data.batch(torch.arange(4))
    out = output_layer(trained_run.modules, (1, len(trained_run.classes)))
    result = {}
    for method in ("guided", "gradient"):
        names, maps = sanity.mprt(trained_run.model, x, y, lambda m, i, c, method=method: sanity.class_maps(
            m, i, c, method, out, len(trained_run.classes)))
        first = np.abs(maps[0].flatten(1).numpy())
        result[method] = [sanity.spearman(first, np.abs(m.flatten(1).numpy())).mean() for m in maps[1:]]
    for method, values in result.items():
        for step, value in zip(("fc8", "fc7", "fc6"), values):
            measured(f"sanity.{method}.after_{step}", value)
        measured(f"sanity.{method}.all_random", values[-1])
    assert result["guided"][0] > 0.95 and result["gradient"][0] < 0.8  # fc8 randomised
    assert result["guided"][2] > result["gradient"][2] + 0.2  # fc6 too
    assert result["guided"][-1] < 0.6 and result["gradient"][-1] < 0.5  # everything randomised
