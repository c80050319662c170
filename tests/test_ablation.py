"""Architecture ablation (paper Table 3): the variants' configs, resuming an interrupted variant, not retraining a
finished one, the written table, and the paper's depth effect (removing conv3-4 and fc6-7 together costs far
more than either alone) on the embedded ``pairs`` set, a task that needs it. On the twelve-class synthetic set
the effect does not show at any budget tried (see ``convscope.demo``'s PAIRS comment for the numbers)."""

import json

import pytest
import torch

import convscope.train as training
from convscope import ablation
from convscope.ablation import PAPER_TABLE3, VARIANTS, ablate, variant_config, write_ablation
from convscope.checkpoint import read_weights
from convscope.config import TrainConfig
from convscope.errors import ConvscopeError
from convscope.models import create_model

# digits (scikit-learn's, bundled) at 64 px: real data, small and fast
TINY = dict(data="digits", image_size=64, n_train=64, n_val=32, n_test=32, batch_size=32, epochs=2)


def test_variants_resize_and_remove_as_the_paper_does():
    base = TrainConfig()
    spec = lambda v: create_model("zfnet_small", 2, **variant_config(base, v).model_options).spec  # noqa: E731
    assert spec("full") == create_model("zfnet_small", 2).spec
    assert spec("no_conv34").remove == ("conv3", "conv4")
    assert spec("no_conv34_fc67").remove == ("conv3", "conv4", "fc6", "fc7")
    assert spec("fc_half").fc == (128, 128) and spec("fc_double").fc == (512, 512)
    # 384, 384, 256 -> 512, 1024, 512 in the paper; zfnet_small's 96, 96, 64 -> 128, 256, 128
    assert spec("wide_conv345").widths == (32, 64, 128, 256, 128)
    assert spec("wide_conv345_fc_double").widths == (32, 64, 128, 256, 128)
    assert ablation._widen((96, 256, 384, 384, 256)) == (96, 256, 512, 1024, 512)
    assert all(row in PAPER_TABLE3 for row, _, _ in VARIANTS.values())
    assert PAPER_TABLE3["Removed layers 3,4,6,7"] == (71.1, 71.3, 50.1)
    with pytest.raises(ConvscopeError, match="unknown variant 'no_conv9'"):
        variant_config(base, "no_conv9")
    with pytest.raises(ConvscopeError, match="not a ZF-style net"):
        variant_config(TrainConfig(model="vgg16"), "full")
    with pytest.raises(ConvscopeError, match="unknown variant"):
        ablate(TrainConfig(**TINY), "unused", variants=["full", "bogus"])


@pytest.mark.slow
def test_interrupted_variant_resumes_and_finished_ones_are_not_retrained(tmp_path, monkeypatch):
    base = TrainConfig(**TINY)
    variants = ["full", "no_fc7"]
    whole = ablate(base, tmp_path / "whole", variants, progress=False)

    # interrupt the second variant after its first epoch's state is saved (as a kill would, between epochs)
    real_save, saves = training.save_state, []

    def dying_save(path, state):
        real_save(path, state)
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ablate(base, tmp_path / "cut", variants, progress=False)
    assert (tmp_path / "cut" / "full" / "model.safetensors").is_file()
    assert not (tmp_path / "cut" / "no_fc7" / "model.safetensors").exists()
    assert len(json.loads((tmp_path / "cut" / "no_fc7" / "metrics.json").read_text())) == 1

    # resume: only the missing epoch of no_fc7 is trained, and the weights equal the uninterrupted run's
    saves.clear()
    monkeypatch.setattr(training, "save_state", lambda p, s: saves.append(p) or real_save(p, s))
    cut = ablate(base, tmp_path / "cut", variants, progress=False)
    assert [p.parent.name for p in saves] == ["no_fc7"]
    for v in variants:
        a = read_weights(tmp_path / "whole" / v / "model.safetensors")[0]
        b = read_weights(tmp_path / "cut" / v / "model.safetensors")[0]
        assert all(torch.equal(a[k], b[k]) for k in a), v
    assert [r.val_top1_err for r in cut.rows] == [r.val_top1_err for r in whole.rows]

    # a finished ablation is loaded, not retrained: no state saved, no file rewritten
    saves.clear()
    def mtimes():  # of the run files; .lock only says who holds the run
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "cut").rglob("*") if p.is_file() and p.name != ".lock"}

    before = mtimes()
    again = ablate(base, tmp_path / "cut", variants, progress=False)
    assert saves == []
    assert mtimes() == before
    assert [r.train_top1_err for r in again.rows] == [r.train_top1_err for r in cut.rows]

    paths = write_ablation(again, tmp_path / "cut")
    assert [p.name for p in paths] == ["ablation.json", "ablation.md", "ablation.png"]
    table = (tmp_path / "cut" / "ablation.md").read_text()
    assert "| no_fc7 |" in table and "27.4 / 40.0 / 18.4" in table
    rows = json.loads((tmp_path / "cut" / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == variants
    # a different budget in the same folder is refused, not mixed in
    with pytest.raises(ConvscopeError, match="already holds a different run"):
        ablate(TrainConfig(**{**TINY, "epochs": 3}), tmp_path / "cut", ["full"], progress=False)


@pytest.mark.slow
def test_without_conv3_4_and_fc6_7_the_net_cannot_fit_while_without_conv3_4_alone_it_fits(trained_folder, measured):
    """The demo's ablation (the named config "pairs": zfnet_small at half width, 128 px, 2000 images) stopped at
    epoch 14 of its 20 (the schedule does not depend on the number of epochs, so these are the demo's runs at
    epoch 14; about 40 s a variant), kept in pytest's cache folder like the trained fixtures. The two variants
    whose outcome is structural: without conv3-4, a conv5 unit still sees both discs' colours through fc6-7 and
    the net fits pairs within two epochs at every seed; without conv3-4 and fc6-7, no layer sees both discs
    (test_pairs.py) and the net cannot even fit its training set (the paper's 71.1 / 71.3). Measured over seeds
    0-2 (scripts/seeds.py): no_conv34 val error 0.0-0.2 %, no_conv34_fc67 val 48-53 %, train 41 %. Not
    asserted: the net without fc6-7 alone, whose leaving chance is a matter of seed (measured: epoch 8, epoch 14,
    and still at chance at epoch 14 on this machine's seed 0), which the demo's Table 3 verdict reports."""
    from dataclasses import replace

    from helpers import SEED, keyed

    from convscope.demo import PAIRS

    cfg = replace(PAIRS, epochs=14, seed=SEED)
    result = ablate(cfg, keyed(trained_folder, "ablation-pairs", cfg.to_dict()), ["no_conv34", "no_conv34_fc67"],
                    progress=False)
    val = {r.variant: r.val_top1_err for r in result.rows}
    train = {r.variant: r.train_top1_err for r in result.rows}
    for variant in val:
        measured(f"table3.{variant}.val_err", val[variant])
        measured(f"table3.{variant}.train_err", train[variant])
    assert val["no_conv34"] < 0.05
    assert val["no_conv34_fc67"] > 0.4 and train["no_conv34_fc67"] > 0.3
