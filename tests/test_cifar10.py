import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import convscope as cs
from convscope.cli import main
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


def _write_batch(name: str, **changes):
    """Write batch ``name`` of the good set with some of its entries changed."""
    def mutate(folder):
        batch = _batch(int(name[-1]), PER_BATCH)
        batch.update({k.encode(): v(folder) if callable(v) else v for k, v in changes.items()})
        _dump(folder / name, batch)
        return folder.parent
    return mutate


def _labels(labels):
    return _write_batch("data_batch_1", labels=labels)


def _bytes(name: str, content):
    def mutate(folder):
        path = folder / name
        path.write_bytes(content(path.read_bytes()))
        return folder.parent
    return mutate


def _missing(name: str):
    def mutate(folder):
        (folder / name).unlink()
        return folder
    return mutate


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


def _evil_meta(folder):
    _dump(folder / "batches.meta", {b"label_names": _Evil(folder.parent / "pwned")})
    return folder


def _elsewhere(name: str):
    def mutate(folder):
        (folder.parent / name).mkdir(exist_ok=True)
        return folder.parent / name
    return mutate


BOMB = pickle.dumps({b"labels": [[0] * 1000] * 1000}) + b"\0" * (41 << 20)

# every kind of bad CIFAR-10 folder: what is done to a good one -> what the refusal says
BAD = {
    "no folder": (lambda f: f.parent / "nowhere", "does not exist"),
    "empty folder": (_elsewhere("empty"), "batches.meta"),
    "a batch missing": (_missing("data_batch_4"), "data_batch_4"),
    "pickle runs os.system": (_write_batch("data_batch_1", labels=lambda f: _Evil(f.parent / "pwned")),
                              "not a valid CIFAR-10 batch and was refused"),
    "pickle opens a file": (_write_batch("data_batch_1", labels=lambda f: _EvilOpen(f.parent / "pwned")),
                            "not a valid CIFAR-10 batch and was refused"),
    "meta runs os.system": (_evil_meta, "refused"),
    "truncated batch": (_bytes("data_batch_2", lambda raw: raw[: len(raw) // 2]), "data_batch_2.*corrupt or truncated"),
    "empty batch": (_bytes("data_batch_2", lambda raw: b""), "data_batch_2"),
    "rows of 3000 bytes": (_write_batch("data_batch_1", data=_batch(1, PER_BATCH)[b"data"][:, :3000]),
                           r"uint8 \(N, 3072\)"),
    "label 10": (_labels([0, 1, 2, 10]), "0..9"),
    "float label": (_labels([0, 1, 2.0, 3]), re.escape("whole numbers from 0, found 2.0 (float)")),
    "string label": (_labels([0, 1, "2", 3]), "whole numbers from 0, found '2' \\(str\\)"),
    "bool label": (_labels([0, 1, True, 3]), re.escape("found True (bool)")),
    "huge label": (_labels([0, 1, 2 ** 70, 3]), re.escape("found 1180591620717411303424 (int)")),
    "negative label": (_labels([0, 1, -1, 3]), re.escape("found -1 (int)")),
    "nested label": (_labels([0, 1, [[2] * 3] * 3, 3]), re.escape("found [[2, 2, 2]")),
    "too few labels": (_labels([0, 1, 2]), "4 images but 3 labels"),
    "labels a dict": (_labels({0: 1}), "4 images but a dict"),
    "batch larger than CIFAR-10": (_bytes("data_batch_3", lambda raw: BOMB),
                                   "data_batch_3 is .* bytes, more than a CIFAR-10 file ever has"),
    "meta larger than CIFAR-10": (_bytes("batches.meta", lambda raw: b"\0" * 70000), "batches.meta is 70000 bytes"),
}


@pytest.mark.parametrize("case", BAD)
def test_every_bad_folder_is_refused_with_the_file_named(cifar, case):
    """Labels that are floats or strings, too large, nested, or too few are refused with the batch named, before
    numpy or training sees them (before, floats and strings trained silently and 2**70 raised OverflowError); a
    pickle that would run code runs none; a file larger than any CIFAR-10 file is refused unread."""
    mutate, message = BAD[case]
    root = mutate(cifar)
    with pytest.raises(ConvscopeError, match=message):
        for split in ("train", "test"):
            load_cifar10(root, split)
    assert not (cifar.parent / "pwned").exists()


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("out", ["new", "empty"])
def test_training_on_a_bad_folder_exits_2_and_writes_nothing(cifar, case, out):
    """Before: refused only after the run directory and its config.json were written."""
    mutate, message = BAD[case]
    root, run = mutate(cifar), cifar.parent / "run"
    if out == "empty":
        run.mkdir()
    r = CliRunner().invoke(main, ["train", "--data", "cifar10", "--data-root", str(root), "--model", "zfnet_small",
                                  "--epochs", "1", "--out", str(run)])
    assert r.exit_code == 2, r.output
    assert re.search(message, r.output.replace("\n", " ")) and "Traceback" not in r.output
    assert (list(run.iterdir()) == []) if out == "empty" else not run.exists()
    assert not (cifar.parent / "pwned").exists()


def test_the_other_split_is_unaffected_and_splits_are_named(cifar):
    (cifar / "data_batch_4").unlink()
    assert len(load_cifar10(cifar, "test")) == 3
    with pytest.raises(ConvscopeError, match="valid splits: train, test"):
        load_cifar10(cifar, "validation")


def test_an_unknown_class_in_a_config_file_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "c.json").write_text('{"classes": ["car", "nope"]}')
    (tmp_path / "empty").mkdir()
    for out in ("new", "empty"):
        r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / out)])
        assert r.exit_code == 2 and "unknown class 'nope'; valid classes: face, car," in r.output
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


def test_class_names_that_are_not_utf8_are_shown_escaped_with_a_note(cifar):
    names = [n.encode() for n in CLASSES]
    names[3] = b"caf\xe9"  # Latin-1, as a Python 2 script may have written it
    _dump(cifar / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    with pytest.warns(UserWarning, match=r"the class name b'caf\\xe9' is not UTF-8; shown as 'caf\\\\xe9'"):
        ds = load_cifar10(cifar.parent, "test")
    assert ds.classes[3] == "caf\\xe9" and ds.classes[:3] == CLASSES[:3]


def test_training_on_class_names_that_are_not_utf8_says_how_they_are_shown(cifar):
    """Not a refusal: the run trains, its classes hold the escaped name, and the note says so."""
    names = [n.encode() for n in CLASSES]
    names[3] = b"caf\xe9"
    _dump(cifar / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    for b in range(1, 6):  # 100 images of 4 classes: a validation split of 10 of them
        _dump(cifar / f"data_batch_{b}", {**_batch(b, 20), b"labels": [i % 4 for i in range(20)]})
    run, config = cifar.parent / "run", cifar.parent / "c.json"
    config.write_text(json.dumps({"data": "cifar10", "data_root": str(cifar), "model": "zfnet_small", "epochs": 1,
                                  "batch_size": 8, "model_options": {"input_size": 32}}))
    r = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert r.output.count("the class name b'caf\\xe9' is not UTF-8; shown as 'caf\\\\xe9'") == 1  # said once
    assert cs.open_run(run).classes[3] == "caf\\xe9"
