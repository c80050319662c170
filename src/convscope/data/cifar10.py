"""CIFAR-10 from the official *python* batches (``cifar-10-batches-py``), read without trusting pickle.

The batches are pickles written by Python 2. A pickle can run any code on load, so they are read with an
unpickler that resolves only the three names a numpy array needs; anything else (``os.system`` behind a
``__reduce__``, say) is refused before it is called.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ConvscopeError, unknown
from .base import ImageSet

FOLDER = "cifar-10-batches-py"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META = "batches.meta"


def _reconstruct():
    try:  # numpy >= 2 renamed numpy.core to numpy._core; resolve directly so old pickles load without warnings
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _Refused(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy array reconstruction; every other global is refused."""

    def find_class(self, module, name):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise _Refused(f"{module}.{name}")
        return make()


# The largest file read: a CIFAR-10 batch is 30.7 MB, its meta file 158 bytes. A bigger file is not CIFAR-10,
# and a pickle's size bounds the work of reading it.
MAX_BYTES = {META: 1 << 16}
MAX_BATCH_BYTES = 40 << 20


def _load_pickle(path: Path) -> object:
    limit = MAX_BYTES.get(path.name, MAX_BATCH_BYTES)
    if path.is_file() and path.stat().st_size > limit:
        raise ConvscopeError(f"{path} is {path.stat().st_size} bytes, more than a CIFAR-10 file ever has ({limit}); "
                             "it was not read")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise ConvscopeError(
            f"{path} is not a valid CIFAR-10 batch and was refused: it asks to load {e}, which a CIFAR-10 "
            "python batch never needs (loading it could run code)") from None
    except OSError as e:
        raise ConvscopeError(f"cannot read {path}: {e}") from e
    except Exception as e:  # truncated or corrupt: pickle raises many types (EOFError, UnpicklingError, ...)
        raise ConvscopeError(
            f"{path} is not a valid CIFAR-10 batch (corrupt or truncated: {type(e).__name__}: {e}); "
            f"extract cifar-10-python.tar.gz again") from e


def _find_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for folder in (root, root / FOLDER):
        if (folder / META).is_file():
            return folder
    if not root.exists():
        raise ConvscopeError(f"CIFAR-10 folder {root} does not exist; expected the extracted {FOLDER} folder "
                             "(or its parent) of cifar-10-python.tar.gz")
    raise ConvscopeError(f"no CIFAR-10 python batches in {root}: expected {root / META} or "
                         f"{root / FOLDER / META} (extract cifar-10-python.tar.gz there)")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ConvscopeError(f"missing CIFAR-10 batch {path}; expected data_batch_1..5 and test_batch beside "
                             f"{META}")
    d = _load_pickle(path)
    bad = f"{path} is not a valid CIFAR-10 batch"
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ConvscopeError(f"{bad}: expected a dict with keys b'data' and b'labels'")
    data, labels = d[b"data"], d[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ConvscopeError(f"{bad}: data must be uint8 (N, 3072), got "
                             f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    # checked as Python objects before numpy sees them: floats or strings would convert silently, a nested list
    # could grow without bound, and ints beyond 64 bits would overflow
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        what = f"{len(labels)} labels" if isinstance(labels, list) else f"a {type(labels).__name__}"
        raise ConvscopeError(f"{bad}: {data.shape[0]} images but {what}; labels must be a list of one int per image")
    wrong = next((x for x in labels if type(x) is not int or not 0 <= x < 1 << 31), None)
    if wrong is not None:
        raise ConvscopeError(f"{bad}: labels must be whole numbers from 0, found {wrong!r:.40} "
                             f"({type(wrong).__name__})")
    return data, np.asarray(labels, dtype=np.int64)


def _read_classes(folder: Path) -> list[str]:
    meta = _load_pickle(folder / META)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names) or not names:
        raise ConvscopeError(f"{folder / META} is not a valid CIFAR-10 meta file: expected b'label_names'")
    return [_name(n, folder / META) for n in names]


def _name(name: bytes | str, meta: Path) -> str:
    """A class name as the file holds it: the real files are Python 2 pickles of byte strings (ASCII). Bytes that
    are not UTF-8 are shown escaped (``caf\\xe9``), visibly, with a note."""
    if isinstance(name, str):
        return name
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        shown = name.decode("utf-8", errors="backslashreplace")
        warnings.warn(f"{meta}: the class name {name!r} is not UTF-8; shown as {shown!r}", stacklevel=3)
        return shown


def load_cifar10(root: str | Path, split: str = "train") -> ImageSet:
    """CIFAR-10 as an :class:`ImageSet` of uint8 (N, 3, 32, 32) images.

    ``root`` is the extracted ``cifar-10-batches-py`` folder or the folder that holds it. ``split`` "train" reads
    ``data_batch_1`` .. ``data_batch_5`` (all five must be there), "test" reads ``test_batch``; class names come
    from ``batches.meta``.
    """
    if split not in SPLITS:
        raise unknown("split", split, SPLITS)
    folder = _find_folder(root)
    classes = _read_classes(folder)
    parts = [_read_batch(folder / name) for name in SPLITS[split]]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ConvscopeError(f"CIFAR-10 labels in {folder} must lie in 0..{len(classes) - 1} "
                             f"({len(classes)} classes in {META}), found {labels.min()}..{labels.max()}")
    # Each row is the red plane, then green, then blue, each 32x32 row-major: exactly (3, 32, 32) in C order.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageSet(images, torch.from_numpy(labels), classes, name=f"cifar10-{split}")
