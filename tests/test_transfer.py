"""Transfer to small data sets (paper Tables 4-5, Fig. 9): seeded disjoint folds, bad input, frozen pretrained
features beating training from scratch at 5 examples per class on held-out classes, and transfer to digits."""

import os

import pytest
import torch
from conftest import random_imageset

import convscope as cs
from convscope.config import TrainConfig
from convscope.data import ImageSet
from convscope.errors import ConvscopeError
from convscope.transfer import TransferResult, fold_indices, transfer, write_transfer


def test_folds_are_seeded_disjoint_and_n_per_class():
    labels = torch.tensor([0] * 30 + [1] * 25 + [2] * 40)[torch.randperm(95, generator=torch.Generator()
                                                                       .manual_seed(0))]
    folds = fold_indices(labels, 5, 5, seed=3)
    assert len(folds) == 5
    for f in folds:
        assert torch.bincount(labels[f]).tolist() == [5, 5, 5]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not set(folds[i].tolist()) & set(folds[j].tolist())
    again = fold_indices(labels, 5, 5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(folds, again))
    other = fold_indices(labels, 5, 5, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(folds, other))
    # the same order for every n: fold 0 of n=2 lies inside fold 0 of n=5
    assert set(fold_indices(labels, 2, 5, seed=3)[0].tolist()) <= set(folds[0].tolist())


def test_folds_overlap_as_little_as_possible_when_a_class_is_small():
    labels = torch.tensor([0] * 12 + [1] * 50)
    folds = fold_indices(labels, 5, 5, seed=0)
    # class 1 (50 >= 25): disjoint; class 0 (12 < 25): each example in at most ceil(25 / 12) = 3 folds
    ones = [set(f[labels[f] == 1].tolist()) for f in folds]
    assert sum(len(s) for s in ones) == len(set().union(*ones)) == 25
    zeros = torch.cat([f[labels[f] == 0] for f in folds])
    assert torch.bincount(zeros, minlength=12).max().item() == 3
    assert torch.unique(zeros).numel() == 12  # every example used
    with pytest.raises(ConvscopeError, match="class 0 .*12 training examples, fewer than the 13 per class"):
        fold_indices(labels, 13, 5, seed=0)


def test_bad_input_is_a_clear_error():
    model = cs.create_model("zfnet_small", 4)
    train, test = random_imageset([0, 1, 2] * 4), random_imageset([0, 1, 2] * 2, seed=1)
    with pytest.raises(ConvscopeError, match="unknown layer 'fc9'"):
        transfer(model, train, test, shots=(1,), folds=1, layer="fc9", scratch=False)
    with pytest.raises(ConvscopeError, match="class '0' has 4 training examples, fewer than the 5"):
        transfer(model, train, test, shots=(5,), folds=1, scratch=False)
    one = ImageSet(train.images, torch.zeros(12, dtype=torch.long), ["only"])
    with pytest.raises(ConvscopeError, match="at least two"):
        transfer(model, one, one, shots=(1,), folds=1)
    with pytest.raises(ConvscopeError, match="separate test set"):
        transfer(model, train, train, shots=(1,), folds=1)


def test_fold_results_shape_and_files(tmp_path):
    torch.manual_seed(0)
    model = cs.create_model("zfnet_small", 4)
    train, test = random_imageset([0, 1, 2] * 6), random_imageset([0, 1, 2] * 3, seed=1)
    cfg = TrainConfig(batch_size=8)
    result = transfer(model, train, test, shots=(1, 2), folds=2, seed=0, scratch_cfg=cfg, scratch_steps=2,
                      progress=False)
    assert result.pretrained.shape == result.scratch.shape == (2, 2)
    assert ((result.pretrained >= 0) & (result.pretrained <= 1)).all()
    assert [len(f) for f in result.train_indices[2]] == [6, 6]
    mean, std = TransferResult.spread(torch.tensor([[0.5, 0.7, 0.6]], dtype=torch.float64))
    assert mean.item() == pytest.approx(0.6) and std.item() == pytest.approx(0.1)
    paths = write_transfer(result, tmp_path)
    assert [p.name for p in paths] == ["transfer.json", "transfer.md", "transfer.png"]
    assert (tmp_path / "transfer.md").read_text().count("\n| ") == 2  # a row per n


@pytest.mark.slow
def test_frozen_features_transfer_to_digits(trained_run):
    """Tables 4-5 on a real small data set the net never saw (synthetic-pretrained fc7 + softmax, 5 digits per
    class). Measured: 50-56 % (chance 10 %). Trained from scratch for 150 steps the same net reaches 71 %: digits
    are far from the synthetic scenes, so here the frozen features do NOT beat scratch (see the report)."""
    from convscope.data.digits import load_digits

    train, test = load_digits("train", size=64), load_digits("test", size=64)
    result = transfer(trained_run.model, train, test, shots=(1, 5), folds=3, seed=0, scratch=False,
                      progress=False)
    one, five = result.pretrained.mean(1).tolist()
    assert five > 0.35
    assert five > one + 0.08  # more examples per class help (Fig. 9)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CONVSCOPE_LONG_TESTS"),
                    reason="pretrains for 5-20 minutes; set CONVSCOPE_LONG_TESTS=1")
def test_pretrained_features_beat_scratch_on_held_out_classes(tmp_path):
    """Tables 4-5 on synthetic classes held out of pretraining: pretrain on six classes, transfer to the other
    six at 5 per class. Measured with exactly this budget (/work/runs/zf6, 3 folds): 41.2 +- 2.4 % frozen fc7 +
    softmax vs 18.7 +- 2.6 % from scratch (chance 16.7 %). Smaller pretraining budgets (600-1200 images,
    4-20 epochs) leave the net near chance and its features no better than scratch, hence the long budget."""
    from convscope.data.synthetic import CLASSES
    from convscope.runs import open_run
    from convscope.train import train as run_train
    from convscope.transfer import load_target

    cfg = TrainConfig(classes=CLASSES[:6], n_train=6000, n_val=600, n_test=600, epochs=15, batch_size=64)
    run_train(cfg, tmp_path / "six", progress=False)
    run = open_run(tmp_path / "six")
    train, test = load_target("heldout", run=run)
    assert train.classes == test.classes == CLASSES[6:]
    result = transfer(run.model, train, test, shots=(5,), folds=3, seed=0, scratch_cfg=run.config,
                      scratch_steps=150, progress=False)
    pre, scr = result.pretrained.mean().item(), result.scratch.mean().item()
    assert pre > scr + 0.12
    assert pre > 0.3
