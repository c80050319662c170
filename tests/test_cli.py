"""The command line wires the library: exit status 2 and a clear message for bad input, nothing overwritten."""

import json

import numpy as np
from click.testing import CliRunner

from convscope.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_models_lists_every_model_with_its_layers():
    r = _run("models")
    assert r.exit_code == 0
    for name in ("zfnet", "alexnet", "zfnet_small", "alexnet_small", "vgg16", "alexnet_torchvision"):
        assert name in r.output
    assert "conv1, conv2, conv3, conv4, conv5, fc6, fc7" in r.output


def test_unknown_model_and_data_names_list_the_valid_ones(tmp_path):
    r = _run("train", "--model", "resnet", "--out", str(tmp_path / "r"))
    assert r.exit_code == 2
    assert ("unknown model 'resnet'; valid models: alexnet, alexnet_small, alexnet_torchvision, vgg16, zfnet, "
            "zfnet_small") in r.output
    r = _run("train", "--data", "imagenet", "--out", str(tmp_path / "r"))
    assert r.exit_code == 2
    assert "valid data sets: synthetic, synthetic-parts, pairs, cifar10, digits, folder" in r.output
    assert not (tmp_path / "r").exists()


def test_missing_paths_exit_2(tmp_path):
    r = _run("train", "--data", "cifar10", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "does not exist" in r.output
    r = _run("train", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "config file" in r.output and "does not exist" in r.output
    assert not (tmp_path / "r").exists()


def test_config_file_then_cli_overrides(tmp_path):
    from convscope.config import resolve

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('model = "alexnet_small"\nepochs = 7\nlr = 0.02\n')
    cfg = resolve(cfg_file, epochs=3, lr=None)
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.batch_size) == ("alexnet_small", 3, 0.02, 128)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochz": 3}))
    r = _run("train", "--config", str(bad), "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "unknown config keys ['epochz']" in r.output


def test_train_into_a_foreign_run_directory_exits_2_and_keeps_it(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", "digits", "--image-size", "64", "--n-train", "64", "--epochs", "1", "--out", str(run)]
    assert _run(*args).exit_code == 0
    def files():  # the run's files; .lock is the lock's bookkeeping (who holds it), not content of the run
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    r = _run(*args[:-2], "--lr", "0.5", "--out", str(run))
    assert r.exit_code == 2 and "already holds a different run (lr: 0.01 there, 0.5 asked)" in r.output
    assert files() == before
    # a damaged state file of an unfinished run is reported with exit 2 and left as found (a finished run is
    # loaded from its final weights and needs no state)
    state = run / "state.pt"
    state.write_bytes(before[state][:50])
    assert _run(*args).exit_code == 0
    (run / "test.json").unlink()
    r = _run(*args)
    assert r.exit_code == 2 and "training state" in r.output and "is damaged or not convscope's" in r.output
    assert state.read_bytes() == before[state][:50]


def test_preview_writes_a_grid_with_ground_truth(tmp_path):
    from PIL import Image

    out = tmp_path / "preview.png"
    r = _run("data", "preview", "--out", str(out), "--n", "4", "--split", "val")
    assert r.exit_code == 0 and out.is_file()
    with Image.open(out) as im:
        w, h = im.size
        colours = len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0))
    assert w > 4 * 64 and h > 64 and colours > 500  # four rendered scenes, enlarged, with labels drawn on
    r = _run("data", "preview", "--out", str(out), "--split", "holdout")
    assert r.exit_code == 2 and "valid splits: train, val, test" in r.output


def test_transfer_wires_features_and_reports_bad_names(tmp_path):
    run = tmp_path / "run"
    assert _run("train", "--data", "digits", "--image-size", "64", "--n-train", "64", "--epochs", "1",
                "--out", str(run)).exit_code == 0
    r = _run("transfer", str(run), "--target", "digits", "--features", "fc7,fc9", "--shots", "1", "--folds", "1")
    assert r.exit_code == 2 and "unknown layer 'fc9'" in r.output and "conv1" in r.output
    r = _run("transfer", str(run), "--target", "heldout", "--shots", "1", "--folds", "1")
    assert r.exit_code == 2 and "needs a run pretrained on the synthetic data set" in r.output
    assert not (run / "transfer").exists()
    r = _run("transfer", str(run), "--target", "digits", "--features", "conv3,all", "--shots", "1,2", "--folds",
             "2", "--no-scratch")
    assert r.exit_code == 0, r.output
    saved = json.loads((run / "transfer" / "digits" / "transfer.json").read_text())
    assert saved["features"]["conv3"] == ["conv3"] and len(saved["features"]["all"]) == 7
    assert len(saved["pretrained"]["all"]["folds"]) == 2 and saved["scratch"] is None
    assert "| frozen, softmax on conv3 | frozen, softmax on conv1..fc7 joined |" in r.output


def test_ablate_on_pairs_by_its_named_config_and_a_clear_error_without_it(tmp_path):
    # the report's command for Table 3, at a tiny budget
    r = _run("ablate", "--config", "pairs", "--n-train", "16", "--epochs", "1", "--batch-size", "8",
             "--variants", "full,no_conv34_fc67", "--out", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    assert "| no_conv34_fc67 |" in r.output and "71.1 / 71.3 / 50.1" in r.output
    saved = json.loads((tmp_path / "a" / "full" / "config.json").read_text())
    assert saved["data"] == "pairs" and saved["model_options"]["input_size"] == 128 and saved["patience"] == 6
    # a variant's saved config is a config file too: the same run, loaded rather than refused
    r = _run("ablate", "--config", str(tmp_path / "a" / "full" / "config.json"), "--variants", "full",
             "--out", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    r = _run("ablate", "--config", "pears", "--out", str(tmp_path / "b"))
    assert r.exit_code == 2 and "config file 'pears' does not exist (named configs: pairs)" in r.output
    # 128 px images into the 64 px net: what to pass instead, and no model written
    r = _run("train", "--data", "pairs", "--n-train", "8", "--out", str(tmp_path / "t"))
    assert r.exit_code == 2
    assert "takes 64 px images but the data set has 128 px" in r.output
    assert 'model_options {"input_size": 128}' in r.output
    assert not (tmp_path / "t" / "model.safetensors").exists()
