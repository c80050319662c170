import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

from convscope.data.digits import digits_split, load_digits
from convscope.errors import ConvscopeError

SK = sk_load_digits()


def _scaled(v):
    """0..16 -> 0..255, rounded half up (the only half case, 8 -> 127.5, rounds to 128 either way)."""
    return (np.asarray(v, dtype=np.int64) * 255 + 8) // 16


def test_size_8_is_exactly_the_scaled_data():
    ds = load_digits("train", size=8)
    train, _ = digits_split()
    expected = torch.from_numpy(_scaled(SK.images[train]).astype(np.uint8))
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(train), 3, 8, 8)
    for c in range(3):
        assert torch.equal(ds.images[:, c], expected)
    assert ds.labels.tolist() == SK.target[train].tolist()
    assert ds.classes == [str(d) for d in range(10)]


def test_upsampled_3x_keeps_every_source_pixel():
    # align_corners=False: output i reads source (i + 0.5) / 3 - 0.5 = (i - 1) / 3, so pixel 3k + 1 is source k.
    ds = load_digits("train", size=24)
    train, _ = digits_split()
    expected = torch.from_numpy(_scaled(SK.images[train]).astype(np.uint8))
    assert torch.equal(ds.images[:, 1, 1::3, 1::3], expected)
    assert int((expected > 0).sum()) > 10000  # the check is not about blank pixels


def test_upsampled_pixels_hand_computed():
    ds = load_digits("test", size=32)
    _, test = digits_split()
    assert int(ds.images[17, 0, 6, 9]) == 87  # interior pixels that are not blank
    for n in (0, 17, 200):
        src, img = SK.images[test[n]] * 255 / 16, ds.images[n].long()
        assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
        # align_corners=False at 4x: output i reads source (i + 0.5) / 4 - 0.5, clamped to [0, 7]. Rows and
        # columns 0, 1 read exactly 0; 30, 31 read exactly 7.
        for (i, j), (y, x) in {(0, 0): (0, 0), (1, 1): (0, 0), (0, 31): (0, 7), (31, 30): (7, 7)}.items():
            assert int(img[0, i, j]) == int(_scaled(SK.images[test[n]][y, x])), (n, i, j)
        # Row 0 reads source row 0; column 2 reads source column 0.125: 7/8 of column 0 and 1/8 of column 1.
        assert int(img[0, 0, 2]) == round(0.875 * src[0, 0] + 0.125 * src[0, 1])
        # Row 6 reads source row 1.125, column 9 reads 1.875.
        r = 0.875 * src[1] + 0.125 * src[2]
        assert abs(int(img[0, 6, 9]) - (0.125 * r[1] + 0.875 * r[2])) <= 0.5 + 1e-9


def test_split_sizes_disjoint_stratified():
    train, test = digits_split(0.25, seed=0)
    assert len(train) == 1347 and len(test) == 450  # sklearn rounds the test share up: ceil(0.25 * 1797)
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.union1d(train, test), np.arange(1797))
    counts = np.bincount(SK.target, minlength=10)
    test_counts = np.bincount(SK.target[test], minlength=10)
    assert (test_counts > 0).all() and (np.bincount(SK.target[train], minlength=10) > 0).all()
    assert (np.abs(test_counts - counts * 0.25) <= 1).all()
    tr, te = load_digits("train", size=8), load_digits("test", size=8)
    assert len(tr) == 1347 and len(te) == 450
    assert torch.equal(torch.bincount(te.labels, minlength=10), torch.from_numpy(test_counts))


def test_seed_determinism():
    a, b = load_digits("train", size=12, seed=3), load_digits("train", size=12, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    t0, _ = digits_split(seed=0)
    t1, _ = digits_split(seed=1)
    assert not np.array_equal(t0, t1)
    small_train, small_test = digits_split(0.5, seed=0)
    assert len(small_test) == 899 and len(small_train) == 898


def test_errors():
    with pytest.raises(ConvscopeError, match="valid splits: train, test"):
        load_digits("val")
    with pytest.raises(ConvscopeError, match="test_fraction"):
        load_digits(test_fraction=1.0)
    with pytest.raises(ConvscopeError, match="every class"):
        load_digits(test_fraction=0.001)
    with pytest.raises(ConvscopeError, match="at least 8"):
        load_digits(size=4)
