import os
import pickle
import re

import numpy as np
import pytest
import torch

from convscope.data.cifar10 import load_cifar10
from convscope.errors import ConvscopeError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4


def _pixel(batch: int, i: int, c: int, y: int, x: int) -> int:
    """The value the fake data set stores at image i of a batch, channel c, row y, column x."""
    return (batch * 41 + i * 13 + c * 7 + y * 3 + x) % 256


def _batch(batch: int, n: int) -> dict:
    data = np.zeros((n, 3072), np.uint8)
    for i in range(n):
        for c in range(3):
            for y in range(32):
                for x in range(32):
                    data[i, c * 1024 + y * 32 + x] = _pixel(batch, i, c, y, x)  # R plane, G plane, B plane
    labels = [(batch * 3 + i) % 10 for i in range(n)]
    return {b"batch_label": f"batch {batch}".encode(), b"labels": labels, b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def _dump(path, obj):
    """Pickle like the real files: Python 2 wrote them naming ``numpy.core.multiarray._reconstruct``.

    Protocol 3 keeps globals as text lines (so the name can be swapped) and bytes as BINBYTES (no ``_codecs``).
    """
    raw = pickle.dumps(obj, protocol=3)
    path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


@pytest.fixture
def cifar(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(1, 6):
        _dump(folder / f"data_batch_{b}", _batch(b, PER_BATCH))
    _dump(folder / "test_batch", _batch(0, 3))
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CLASSES], b"num_vis": 3072,
                                    b"num_cases_per_batch": PER_BATCH})
    return folder


def test_train_pixels_labels_classes(cifar):
    ds = load_cifar10(cifar.parent, "train")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5 * PER_BATCH, 3, 32, 32)
    assert ds.classes == CLASSES
    assert ds.labels.tolist() == [(b * 3 + i) % 10 for b in range(1, 6) for i in range(PER_BATCH)]
    # Batch 1 image 0, red, top-left: (41 + 0) = 41; batch 2 image 1 (index 5) green (c=1) at y=2, x=5:
    # 82 + 13 + 7 + 6 + 5 = 113; batch 5 image 3 (index 19) blue at y=31, x=31: 205+39+14+93+31 = 382 % 256 = 126.
    assert int(ds.images[0, 0, 0, 0]) == 41
    assert int(ds.images[5, 1, 2, 5]) == 113
    assert int(ds.images[19, 2, 31, 31]) == 126
    expected = torch.tensor([[[[_pixel(3, 2, c, y, x) for x in range(32)] for y in range(32)] for c in range(3)]],
                            dtype=torch.uint8)
    assert torch.equal(ds.images[2 * PER_BATCH + 2 : 2 * PER_BATCH + 3], expected)
    image, label = ds[0]
    assert label == 3 and abs(float(image[0, 0, 0]) - 41 / 255) < 1e-7


def test_test_split_and_root_is_the_folder(cifar):
    ds = load_cifar10(cifar, "test")
    assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 2]
    assert int(ds.images[2, 2, 1, 0]) == 26 + 14 + 3  # i=2, c=2, y=1, x=0 of batch 0


def test_unknown_split(cifar):
    with pytest.raises(ConvscopeError, match="valid splits: train, test"):
        load_cifar10(cifar, "validation")


def test_missing_folder_and_files(tmp_path, cifar):
    with pytest.raises(ConvscopeError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvscopeError, match="batches.meta"):
        load_cifar10(empty)
    (cifar / "data_batch_4").unlink()
    with pytest.raises(ConvscopeError, match="data_batch_4"):
        load_cifar10(cifar, "train")
    assert len(load_cifar10(cifar, "test")) == 3  # the other split is unaffected


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("evil", [_Evil, _EvilOpen])
def test_malicious_pickle_is_refused(cifar, tmp_path, evil):
    marker = tmp_path / "pwned"
    batch = _batch(1, PER_BATCH)
    batch[b"labels"] = evil(marker)
    _dump(cifar / "data_batch_1", batch)
    with pytest.raises(ConvscopeError, match="not a valid CIFAR-10 batch and was refused"):
        load_cifar10(cifar, "train")
    assert not marker.exists()


def test_malicious_meta_is_refused(cifar, tmp_path):
    marker = tmp_path / "pwned"
    _dump(cifar / "batches.meta", {b"label_names": _Evil(marker)})
    with pytest.raises(ConvscopeError, match="refused"):
        load_cifar10(cifar, "test")
    assert not marker.exists()


def test_truncated_batch(cifar):
    path = cifar / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConvscopeError, match="data_batch_2.*corrupt or truncated"):
        load_cifar10(cifar, "train")
    path.write_bytes(b"")
    with pytest.raises(ConvscopeError, match="data_batch_2"):
        load_cifar10(cifar, "train")


def test_wrong_contents(cifar):
    batch = _batch(1, PER_BATCH)
    batch[b"data"] = batch[b"data"][:, :3000]
    _dump(cifar / "data_batch_1", batch)
    with pytest.raises(ConvscopeError, match=r"uint8 \(N, 3072\)"):
        load_cifar10(cifar, "train")
    batch = _batch(1, PER_BATCH)
    batch[b"labels"] = [0, 1, 2, 10]
    _dump(cifar / "data_batch_1", batch)
    with pytest.raises(ConvscopeError, match="0..9"):
        load_cifar10(cifar, "train")


@pytest.mark.parametrize("labels, message", [
    ([0, 1, 2.0, 3], "whole numbers from 0, found 2.0 (float)"),
    ([0, 1, "2", 3], "whole numbers from 0, found '2' (str)"),
    ([0, 1, True, 3], "found True (bool)"),
    ([0, 1, 2 ** 70, 3], "found 1180591620717411303424 (int)"),
    ([0, 1, -1, 3], "found -1 (int)"),
    ([0, 1, [[2] * 3] * 3, 3], "found [[2, 2, 2]"),
    ([0, 1, 2], "4 images but 3 labels"),
    ({0: 1}, "4 images but a dict"),
])
def test_cifar_labels_are_checked_before_use(cifar, labels, message):
    """Labels that are floats or strings, too large, nested, or too few: refused with the batch named, before
    numpy or training sees them (before, floats and strings trained silently and 2**70 raised OverflowError)."""
    batch = _batch(1, PER_BATCH)
    batch[b"labels"] = labels
    _dump(cifar / "data_batch_1", batch)
    with pytest.raises(ConvscopeError, match="data_batch_1 is not a valid CIFAR-10 batch: .*" + re.escape(message)):
        load_cifar10(cifar, "train")


def test_a_file_larger_than_cifar_is_not_read(cifar):
    """A pickle's size bounds what reading it costs: a 'label bomb' larger than any CIFAR-10 file is refused unread."""
    (cifar / "data_batch_3").write_bytes(pickle.dumps({b"labels": [[0] * 1000] * 1000}) * 1 + b"\0" * (41 << 20))
    with pytest.raises(ConvscopeError, match="data_batch_3 is .* bytes, more than a CIFAR-10 file ever has"):
        load_cifar10(cifar, "train")
    (cifar / "batches.meta").write_bytes(b"\0" * 70000)
    with pytest.raises(ConvscopeError, match="batches.meta is 70000 bytes"):
        load_cifar10(cifar, "test")


def test_class_names_that_are_not_utf8_are_shown_escaped_with_a_note(cifar):
    names = [n.encode() for n in CLASSES]
    names[3] = b"caf\xe9"  # Latin-1, as a Python 2 script may have written it
    _dump(cifar / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    with pytest.warns(UserWarning, match=r"the class name b'caf\\xe9' is not UTF-8; shown as 'caf\\\\xe9'"):
        ds = load_cifar10(cifar.parent, "test")
    assert ds.classes[3] == "caf\\xe9" and ds.classes[:3] == CLASSES[:3]
