"""Training: the paper's filter renormalisation, resume after SIGKILL, checkpoints, refusing foreign run dirs."""

import json
import os
from pathlib import Path

import pytest
import torch

import convscope as cs
from convscope.checkpoint import load_model
from convscope.config import TrainConfig
from convscope.layout import Layout
from convscope.train import evaluate, renormalize_filters_, train

# digits (scikit-learn's, bundled) at 64 px: real data, small and fast
TINY = dict(data="digits", image_size=64, n_train=384, n_val=64, n_test=128, batch_size=32, epochs=3)


def _conv_rms(model):
    return {n: m.weight.flatten(1).pow(2).mean(1).sqrt() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d)}


def test_renormalisation_caps_filter_rms_and_leaves_small_filters_alone():
    torch.manual_seed(0)
    model = cs.create_model("zfnet_small", 10)
    conv = model.features.conv2
    with torch.no_grad():
        conv.weight.mul_(0.0).add_(0.02)  # RMS 0.02: under the radius
        conv.weight[3].fill_(0.5)  # RMS 0.5: five times over
    before = conv.weight.clone()
    renormalize_filters_(model, 0.1)
    rms = _conv_rms(model)["features.conv2"]
    assert rms[3].item() == pytest.approx(0.1, rel=1e-5)
    assert torch.equal(conv.weight[torch.arange(64) != 3], before[torch.arange(64) != 3])
    torch.testing.assert_close(conv.weight[3], before[3] / 5)  # rescaled, direction kept


def test_no_filter_rms_above_radius_after_training_steps(tmp_path):
    # layer 1 at He's scale (RMS 0.12, over the radius), as the small nets' other layers start
    he = {**TINY, "epochs": 1, "n_train": 96, "lr": 0.05, "model_options": {"conv1_std": None}}
    result = train(TrainConfig(**he), tmp_path / "run", progress=False)
    for name, rms in _conv_rms(result.model).items():
        assert rms.max().item() <= 0.1 + 1e-6, name
    # and without it, layer-1 filters stay past the radius (what Fig. 6a shows)
    cfg_off = TrainConfig(**{**he, "renorm": False})
    off = train(cfg_off, tmp_path / "off", progress=False)
    assert _conv_rms(off.model)["features.conv1"].max().item() > 0.1


def test_run_directory_holds_checkpoints_metrics_and_reloads(tmp_path):
    cfg = TrainConfig(**TINY)
    result = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all(0 <= m["val_top1_err"] <= 1 and m["val_top5_err"] <= m["val_top1_err"] for m in metrics)
    assert metrics[0]["lr"] == 0.01
    # paper epochs within the run: 1 and 2; plus the final weights
    assert Layout(run).checkpoint(1).is_file() and Layout(run).checkpoint(2).is_file()
    assert not Layout(run).checkpoint(3).exists()
    model, info = load_model(run / "model.safetensors")
    assert info["epoch"] == 3 and info["classes"] == [str(i) for i in range(10)]
    assert info["config"]["model"] == "zfnet_small"
    x = torch.rand(4, 3, 64, 64)
    torch.testing.assert_close(model(x), result.model.eval()(x))
    # the data mean went into the model: normalised inputs have mean ~0 on training images
    assert model.normalize.std.item() > 0.05 and model.normalize.mean.abs().sum() > 0
    # a finished run is loaded, not retrained
    mtime = (run / "state.pt").stat().st_mtime_ns
    again = train(cfg, run, progress=False)
    assert (run / "state.pt").stat().st_mtime_ns == mtime and again.test == result.test
    # same seed, same numbers; another seed, others
    twin = train(cfg, tmp_path / "twin", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(twin.model.state_dict().values(), result.model.state_dict().values()))
    other = train(TrainConfig(**{**TINY, "seed": 1, "epochs": 1}), tmp_path / "other", progress=False)
    assert not torch.equal(other.model.features.conv1.weight, result.model.features.conv1.weight)


def test_refuses_a_directory_holding_another_run_and_overwrites_nothing(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1, "n_train": 64}), run, progress=False)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(cs.ConvscopeError, match=r"already holds a different run \(epochs: 1 there, 2 asked\)"):
        train(TrainConfig(**{**TINY, "epochs": 2, "n_train": 64}), run, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(cs.ConvscopeError, match="not an empty directory or a convscope run"):
        train(TrainConfig(**{**TINY, "epochs": 1, "n_train": 64}), junk, progress=False)
    assert (junk / "notes.txt").read_text() == "mine" and len(list(junk.iterdir())) == 1


def test_corrupt_and_truncated_checkpoints_are_refused(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1, "n_train": 64}), run, progress=False)
    good = (run / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(cs.ConvscopeError, match="corrupt or truncated"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(1000))
    with pytest.raises(cs.ConvscopeError, match="corrupt or truncated"):
        load_model(tmp_path / "noise.safetensors")
    with pytest.raises(cs.ConvscopeError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    state = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(state[:100])
    # a finished run is loaded from its final weights: a damaged state does not matter to it
    again = train(TrainConfig(**{**TINY, "epochs": 1, "n_train": 64}), run, progress=False)
    assert again.metrics == json.loads((run / "metrics.json").read_text()) and len(again.metrics) == 1
    (run / "test.json").unlink()  # now it is not finished: the state is needed, and damaged
    with pytest.raises(cs.ConvscopeError, match="training state .* is damaged or not convscope's"):
        train(TrainConfig(**{**TINY, "epochs": 1, "n_train": 64}), run, progress=False)
    assert (run / "state.pt").read_bytes() == state[:100]  # left as found, for the user to inspect
    assert Path(run / "model.safetensors").read_bytes() == good


def test_evaluation_batches_and_mean_image_chunks_change_no_number():
    # both are sized by pixels so that 128 px images take no more memory than 64 px ones (the demo's peak)
    from convscope.data.base import ImageSet
    from convscope.data.transforms import mean_and_std

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 24, 24), dtype=torch.uint8, generator=g)
    x = images.double() / 255
    by_hand = (x.mean(0).float(), (x.pow(2).mean() - x.mean(0).pow(2).mean()).sqrt().float())
    for chunk in (1, 3 * 24 * 24 * 5, 10 ** 9):  # one image at a time, five, all at once
        mean, std = mean_and_std(images, chunk=chunk)
        torch.testing.assert_close(mean, by_hand[0], rtol=0, atol=1e-7)
        torch.testing.assert_close(std, by_hand[1], rtol=0, atol=1e-7)
    torch.manual_seed(0)
    model = cs.create_model("zfnet_small", 10).eval()
    data = ImageSet(torch.randint(0, 256, (23, 3, 64, 64), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (23,), generator=g), [str(i) for i in range(10)])
    with torch.no_grad():
        logits = model(data.batch(torch.arange(23))[0])
    wrong = (logits.argmax(1) != data.labels).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, data.labels).item()
    for batch_size in (None, 1, 7, 500):
        result = evaluate(model, data, batch_size)
        assert result["top1_err"] == wrong
        assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_crop_flip_moves_and_flips_as_drawn_and_flip_false_never_flips():
    """Zero-padded translation by the drawn offset, then a mirror where drawn; without flip the generator advances
    alike (the rest of the run's random choices stay where they were) and nothing is mirrored."""
    from convscope.data.transforms import crop_flip, draw_crop_flip, random_crop_flip

    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4) + 1
    out = crop_flip(x, 1, torch.tensor([[0, 2], [1, 1]]), torch.tensor([True, False]))
    # image 0 is [[1..4], [5..8], [9..12]]: the window at (0, 2) of it padded by 1 keeps a zero row above and
    # columns 2..4 with a zero column after, then it is mirrored
    assert out[0, 0].tolist() == [[0, 0, 0, 0], [0, 4, 3, 2], [0, 8, 7, 6]]
    assert torch.equal(out[1], x[1])  # offset (1, 1) with pad 1 is the image itself
    offsets, flips = draw_crop_flip(64, 2, torch.Generator().manual_seed(3))
    assert 0 <= offsets.min() and offsets.max() <= 4 and 16 < flips.sum() < 48
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    moved = random_crop_flip(x, 1, g1, flip=False)
    offsets, _ = draw_crop_flip(2, 1, g2)
    assert torch.equal(moved, crop_flip(x, 1, offsets, torch.tensor([False, False])))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_a_run_without_renormalisation_starts_where_its_twin_first_renormalised(tmp_path, monkeypatch):
    """Fig. 6a's pair: until renormalisation first rescales a filter, the run with it is the run without it bit
    for bit (it multiplies every filter by exactly 1). Started from its twin's state at that point, the run
    without renormalisation trains only the epochs after it and ends exactly as trained from the start."""
    import convscope.train as training
    from convscope.checkpoint import read_weights

    # filters that grow (lr 0.1, no decay) past a radius above every filter's start: renormalisation first acts
    # after an epoch or two
    base = {**TINY, "epochs": 4, "save_epochs": [1, 2, 3, 4], "lr": 0.1, "weight_decay": 0.0,
            "renorm_radius": 0.068, "model_options": {"conv1_std": 0.05}}
    twin = train(TrainConfig(**base), tmp_path / "twin", progress=False)
    counts = [m["renormalised"] for m in twin.metrics]
    shared = next(i for i, c in enumerate(counts) if c)  # the epochs before renormalisation first acted
    assert 0 < shared < 4 and counts[:shared] == [0] * shared, counts
    idle = torch.load(Layout(tmp_path / "twin").idle_state, weights_only=True)
    assert idle["epoch"] == shared and idle["config"]["renorm"] is True

    off = TrainConfig(**{**base, "renorm": False})
    scratch = train(off, tmp_path / "scratch", progress=False)
    epochs = []
    real = training.train_epoch
    monkeypatch.setattr(training, "train_epoch", lambda *a, **kw: (epochs.append(a[3]), real(*a, **kw))[1])
    forked = train(off, tmp_path / "forked", progress=False, renorm_twin=tmp_path / "twin")
    assert epochs == list(range(shared + 1, 5))  # the shared epochs were not trained again
    for name in ["model.safetensors", *(f"checkpoints/epoch_{e:03d}.safetensors" for e in range(1, 5))]:
        (a, meta_a), (b, meta_b) = read_weights(tmp_path / "scratch" / name), read_weights(tmp_path / "forked" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert meta_a == meta_b, name  # the config inside says renorm false, as trained from the start
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in forked.metrics]
    assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in scratch.metrics]
    assert forked.test == scratch.test
    assert json.loads((tmp_path / "forked" / "config.json").read_text())["renorm"] is False

    # a twin of other settings shares nothing: the run trains from the start
    epochs.clear()
    train(TrainConfig(**{**base, "renorm": False, "seed": 3}), tmp_path / "other", progress=False,
          renorm_twin=tmp_path / "twin")
    assert epochs == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_main_runs_recipe_reaches_its_accuracy(trained_run, untrained_run, measured):
    """The paper's recipe trains zfnet_small on the embedded data (the demo's main run, on 1000 test images; the
    README's test error): far from chance (11/12 error), where the same net at its initialisation stays. Measured
    over training seeds 0-2 (scripts/seeds.py): 6.1-9.5 % (untrained 90.9-92.1 %); with patience 2, seed 2 was
    annealed on an early plateau and ended at 60 %."""
    result = json.loads(trained_run.layout.test.read_text())
    error = result["top1_err"]
    control = evaluate(untrained_run.model, trained_run.split("test"))["top1_err"]
    measured("train.test_top1_err", error)
    measured("control.train.test_top1_err", control)
    assert error < 0.15
    assert control > 0.8
