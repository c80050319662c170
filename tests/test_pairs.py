"""The embedded ``pairs`` set: deterministic, balanced, its class given by the two discs' colours alone, and its
geometry beyond the reach of a conv5 unit of zfnet_small without conv3-4 (why the Table 3 ablation on it shows
the paper's depth effect; the ablation itself is in test_ablation.py)."""

import numpy as np
import pytest
import torch

from convscope.data import load_splits
from convscope.data.pairs import CLASSES, FIFTH, load_pairs
from convscope.errors import ConvscopeError
from convscope.models import create_model
from convscope.receptive_field import receptive_field


def test_images_are_deterministic_per_index():
    a, b = load_pairs("val", n=6), load_pairs("val", n=12)
    assert torch.equal(a.images, b.images[:6]) and torch.equal(a.truth.masks, b.truth.masks[:6])
    assert not torch.equal(load_pairs("val", n=6, seed=1).images, a.images)
    assert not torch.equal(load_pairs("test", n=6).images, a.images)


def test_class_is_whether_the_two_discs_share_a_colour_and_neither_alone_tells_it():
    data = load_pairs("train", n=400)
    assert data.classes == CLASSES == ["different", "same"]
    assert data.labels.tolist() == [0, 1] * 200
    size = data.image_size
    red = []
    for side in ("left_disc", "right_disc"):
        x, y = data.truth.parts[side].long().unbind(1)
        pixel = data.images[torch.arange(len(data)), :, y, x].float()  # the disc's centre pixel, (n, 3)
        assert ((pixel[:, 0] - pixel[:, 2]).abs() > 100).all()  # clearly red or clearly blue
        red.append(pixel[:, 0] > pixel[:, 2])
    assert torch.equal((red[0] == red[1]).long(), data.labels)
    for c in (0, 1):  # each colour about equally often on each side in each class: one disc says nothing
        for r in red:
            assert 0.4 < r[data.labels == c].float().mean() < 0.6
    # every disc pixel lies in the outer fifths, so the discs are more than 0.62 sides apart, edge to edge
    cols = data.truth.masks.any(dim=1)  # (n, W)
    inner = slice(int(np.ceil(FIFTH * size)), int((1 - FIFTH) * size))
    assert not cols[:, inner].any()
    assert cols[:, : inner.start].any(1).all() and cols[:, inner.stop:].any(1).all()
    assert ((data.truth.boxes[:, 2] - data.truth.boxes[:, 0]) > (1 - 2 * FIFTH) * size).all()


def test_no_conv5_unit_without_conv3_4_sees_both_fifths_but_with_them_one_does():
    size = 128
    left, right = FIFTH * size, (1 - FIFTH) * size  # a left disc ends before x = left, a right one starts after

    def widest(remove):
        net = create_model("zfnet_small", 2, input_size=size, remove=remove)
        positions = [(3, c) for c in range(8)]  # conv5 is 8x8 at 128 px
        return [(b.x0, b.x1) for b in receptive_field(net, "conv5", positions)]

    shallow = widest(["conv3", "conv4", "fc6", "fc7"])
    assert max(x1 - x0 for x0, x1 in shallow) == 75
    assert not any(x0 < left and x1 > right for x0, x1 in shallow)
    assert any(x0 < left and x1 > right for x0, x1 in widest(["fc6", "fc7"]))


def test_bad_input_is_refused_with_the_valid_choices():
    with pytest.raises(ConvscopeError, match="unknown split 'dev'.*train, val, test"):
        load_pairs("dev")
    with pytest.raises(ConvscopeError, match="size must be"):
        load_pairs(size=4)
    with pytest.raises(ConvscopeError, match="n must be"):
        load_pairs(n=-1)
    with pytest.raises(ConvscopeError, match="synthetic data sets only"):
        load_splits("pairs", classes=["face"])
    splits = load_splits("pairs", n_train=4, n_val=2, n_test=2)
    assert splits.train.image_size == 128 and splits.train.name == "pairs/train"
