"""Transfer to small data sets (paper Tables 4-5, Fig. 9): seeded disjoint folds, bad input, frozen pretrained
features beating training from scratch at 5 examples per class on held-out classes, and transfer to digits."""

import json

import pytest
import torch
from helpers import random_imageset

import convscope as cs
from convscope.config import TrainConfig
from convscope.data import ImageSet
from convscope.errors import ConvscopeError
from convscope.layout import Layout
from convscope.readout import extract_features, fit_predict, mean_per_class_accuracy
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
    with pytest.raises(ConvscopeError, match="unknown layer 'fc9'.*or \"all\""):
        transfer(model, train, test, shots=(1,), folds=1, features=("fc7", "fc9"), scratch=False)
    with pytest.raises(ConvscopeError, match="no frozen features"):
        transfer(model, train, test, shots=(1,), folds=1, features=(), scratch=False)
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
    assert result.features == {"fc7": ["fc7"], "all": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]}
    assert result.pretrained["fc7"].shape == result.pretrained["all"].shape == result.scratch.shape == (2, 2)
    assert all(((acc >= 0) & (acc <= 1)).all() for acc in result.pretrained.values())
    assert [len(f) for f in result.train_indices[2]] == [6, 6]
    # "all" is the seven layers' pooled features joined: the softmax on them, fold by fold, by hand
    layers = result.features["all"]
    train_f, test_f = extract_features(model, train, layers), extract_features(model, test, layers)
    joined_train = torch.cat([train_f[la] for la in layers], 1)
    joined_test = torch.cat([test_f[la] for la in layers], 1)
    assert joined_train.shape[1] == 32 * 4 + 64 * 4 + 96 * 4 + 96 * 4 + 64 * 4 + 256 + 256
    for i, n in enumerate((1, 2)):
        for f, idx in enumerate(result.train_indices[n]):
            pred = fit_predict("softmax", joined_train[idx], train.labels[idx], joined_test)
            expected = mean_per_class_accuracy(pred, test.labels, 3)
            assert result.pretrained["all"][i, f].item() == pytest.approx(expected)
    # the untrained baseline: the same softmax on the same layers of the scratch nets' architecture at its
    # initialisation under the seed, its input normalisation from the target's training pool
    from convscope.transfer import _scratch_model

    fresh = _scratch_model(model, 3, None, train, 0)
    assert not torch.equal(fresh.features.conv1.weight, model.features.conv1.weight)
    fresh_train = torch.cat([extract_features(fresh, train, ["fc7"])["fc7"]], 1)
    fresh_test = extract_features(fresh, test, ["fc7"])["fc7"]
    for i, n in enumerate((1, 2)):
        for f, idx in enumerate(result.train_indices[n]):
            pred = fit_predict("softmax", fresh_train[idx], train.labels[idx], fresh_test)
            assert result.untrained["fc7"][i, f].item() == pytest.approx(mean_per_class_accuracy(pred, test.labels, 3))
    mean, std = TransferResult.spread(torch.tensor([[0.5, 0.7, 0.6]], dtype=torch.float64))
    assert mean.item() == pytest.approx(0.6) and std.item() == pytest.approx(0.1)
    result.target = "toy"
    paths = write_transfer(result, Layout(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["transfer/toy/transfer.json",
                                                                   "transfer/toy/transfer.md",
                                                                   "transfer/toy/transfer.png"]
    assert json.loads(paths[0].read_text())["pretrained"]["all"]["folds"] == result.pretrained["all"].tolist()
    table = paths[1].read_text()
    assert table.count("\n| ") == 2  # a row per n
    assert ("| frozen, softmax on fc7 | frozen, softmax on conv1..fc7 joined | untrained net, softmax on fc7 | "
            "untrained net, softmax on conv1..fc7 joined | from scratch |") in table
    assert json.loads(paths[0].read_text())["untrained"]["fc7"]["folds"] == result.untrained["fc7"].tolist()


@pytest.mark.slow
def test_on_digits_pretraining_specialises_fc7_and_the_joined_layers_carry(trained_run, untrained_run, measured):
    """Tables 4-5 on a real small data set the net never saw: 5 digits per class, 2 folds, frozen features of the
    synthetic-pretrained net. Digits are far from the synthetic scenes: fc7 is specialised to the pretraining
    classes, and all seven layers joined carry far more; the untrained control's fc7 is not specialised. Nor does
    pretraining on the scenes beat random features here: the untrained net's joined layers transfer as well or
    better (the README's finding), and neither beats the same net trained from scratch by a margin that holds at
    every seed, so neither is asserted. Measured over seeds 0-2 (scripts/seeds.py), mean per-class accuracy:
    joined 0.72-0.75, fc7 0.46-0.53 (joined minus fc7 0.23-0.26), joined at 1 per class 0.38-0.44, from scratch
    0.74; untrained joined 0.85-0.89, fc7 0.71-0.76 (minus 0.10-0.15)."""
    from convscope.data.digits import load_digits

    train, test = load_digits("train", size=64), load_digits("test", size=64)
    result = transfer(trained_run.model, train, test, shots=(5,), folds=2, seed=0,
                      scratch_cfg=trained_run.config, scratch_steps=300, progress=False)
    one = transfer(trained_run.model, train, test, shots=(1,), folds=2, seed=0, scratch=False, progress=False)
    control = transfer(untrained_run.model, train, test, shots=(5,), folds=2, seed=0, scratch=False, progress=False)
    (joined, fc7), scratch = (result.pretrained[k][0].mean().item() for k in ("all", "fc7")), result.scratch.mean()
    c_joined, c_fc7 = (control.pretrained[k][0].mean().item() for k in ("all", "fc7"))
    for name, value in (("all", joined), ("fc7", fc7), ("scratch", scratch),
                        ("all_at_1", one.pretrained["all"][0].mean().item())):
        measured(f"transfer.digits.{name}", value)
    measured("control.transfer.digits.all", c_joined)
    measured("control.transfer.digits.fc7", c_fc7)
    assert joined > fc7 + 0.18
    assert joined > one.pretrained["all"][0].mean().item() + 0.15  # more examples help (Fig. 9)
    assert not c_joined > c_fc7 + 0.18


@pytest.mark.slow
def test_frozen_features_beat_scratch_on_held_out_classes(six_class_run, measured):
    """Tables 4-5 on synthetic classes held out of pretraining: pretrained on six classes (10 epochs), transferred
    to the other six at 5 per class, 2 folds, against the same net from scratch (300 steps) and the same net's
    untrained features, which stay at chance here (unlike on digits). Measured over seeds 0-2 (scripts/seeds.py),
    mean of the folds: fc7 0.25-0.40, all seven layers joined 0.26-0.39, from scratch 0.18-0.19, untrained fc7
    0.17-0.20, joined 0.19-0.20 (chance 0.167). The margins are small at seed 1 (fc7 0.06 over scratch), as the
    fixture stops at epoch 10 of the demo's 15."""
    from convscope.data.synthetic import CLASSES
    from convscope.targets import load_target

    train, test = load_target("heldout", run=six_class_run)
    assert train.classes == test.classes == CLASSES[6:]
    result = transfer(six_class_run.model, train, test, shots=(5,), folds=2, seed=0,
                      scratch_cfg=six_class_run.config, scratch_steps=300, progress=False)
    scratch = result.scratch.mean().item()
    measured("transfer.heldout.scratch", scratch)
    for name in ("fc7", "all"):
        measured(f"transfer.heldout.{name}", result.pretrained[name].mean().item())
    from helpers import untrained_twin

    control = transfer(untrained_twin(six_class_run).model, train, test, shots=(5,), folds=2, seed=0, scratch=False,
                       progress=False)
    for name in ("fc7", "all"):
        measured(f"control.transfer.heldout.{name}", control.pretrained[name].mean().item())
    for name in ("fc7", "all"):
        pretrained, untrained = result.pretrained[name].mean().item(), control.pretrained[name].mean().item()
        assert pretrained > scratch + 0.03 and pretrained > untrained + 0.03, name
        assert not untrained > scratch + 0.03, name
