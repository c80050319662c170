"""The one place convscope writes files. Every write is atomic: a temp file in the same folder, fsync, rename,
so a crash leaves either the old file or the new one, never half of one (and at most a hidden temp file, which
:func:`is_temp` recognises and :func:`clean` removes).

A run directory is written by one process at a time: :func:`lock` holds ``.lock`` in it (an ``flock``, which the
kernel releases when its process ends, however it ends: a killed owner leaves no stale lock), with the owner's pid
and command inside for the message another process gets.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .errors import ConvscopeError

LOCK = ".lock"
_held: dict[Path, int] = {}  # run directories this process holds, and how deep (a lock may be taken again inside)


def is_temp(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temp files, or the lock: not content of a run."""
    return name == LOCK or (name.startswith(".") and name.endswith(".tmp"))


def clean(folder: str | os.PathLike) -> None:
    """Remove the temp files a killed write left in ``folder`` (call it while holding the folder's lock)."""
    folder = Path(folder)
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name != LOCK and is_temp(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def undone_on_failure(folder: str | os.PathLike, keep: Callable[[], bool] = lambda: False, enabled: bool = True
                      ) -> Iterator[None]:
    """If the body raises, remove what it created in ``folder``: the folder itself when it did not exist before,
    else the entries that are new in it (the lock file excepted: :func:`lock` removes its own), unless ``keep()``
    says the folder now holds work worth keeping (a training's first committed epoch). Take it while holding the
    folder's lock, so that what it removes is this process's own."""
    import shutil

    folder = Path(folder)
    before = {e.name for e in os.scandir(folder)} if folder.is_dir() else None
    try:
        yield
    except BaseException:
        if enabled and folder.is_dir() and not keep():
            if before is None:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for entry in os.scandir(folder):
                    if entry.name not in before and entry.name != LOCK:
                        path = Path(entry.path)
                        shutil.rmtree(path, ignore_errors=True) if entry.is_dir(follow_symlinks=False) else \
                            path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def lock(folder: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Hold ``folder/.lock`` for the duration, creating the folder; another process gets a ConvscopeError naming
    the owner. Taken again in the same process (a step inside a step), it is simply held deeper."""

    folder = Path(folder).absolute()
    if folder in _held:
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locking
        yield
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise ConvscopeError(f"{str(folder)!r} is in use by {owner}; wait for it to finish (a lock held by a "
                                 "process that ended is released by itself)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({what or ' '.join(sys.argv[:2])}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        _held[folder] = 1
        try:
            yield
        finally:
            del _held[folder]
            if created and {e.name for e in os.scandir(folder)} == {LOCK}:  # a job that failed before writing
                os.unlink(folder / LOCK)  # leaves no trace (nobody else can hold it: it is ours, and new)
                folder.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """A JSON file's value, or None when it is missing or unreadable (an unfinished or damaged write): the
    reader of every record convscope writes with :func:`write_json`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_record(path: str | os.PathLike, ok: Callable[[Any], bool]) -> tuple[Any | None, str | None]:
    """A JSON record that must be of the shape ``ok`` accepts: (value, None) as written, (None, what is wrong) when
    it is damaged, (None, None) when it is absent."""
    if not Path(path).exists():
        return None, None
    value = read_json(path)
    if value is None:
        return None, "not valid JSON"
    return (value, None) if ok(value) else (None, "not of the shape convscope writes")


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically; read it back with ``torch.load(..., weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_bytes(path, save(tensors, metadata=metadata))


def save_npz(path: str | os.PathLike, compress: bool = True, **arrays) -> Path:
    """Arrays as ``.npz``; ``compress=False`` for data that does not compress (noise) and is written often."""
    import numpy as np

    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return write_bytes(path, buf.getvalue())


# Pictures of units are JPEG at quality 95 without chroma subsampling: deconvnet projections carry colour at the
# pixel scale, which the default halving of the colour resolution (JPEG's and WebP's 4:2:0) turns into errors of
# 40 grey levels and more. At 4:4:4 and 95 the decoded picture is within 4 grey levels of the float one on
# average and 13 (of 255) at the 99th percentile where projections are pixel noise (an untrained net; within 0.5
# and 7 on a random ResNet-50's smoother ones), at a sixth to a half of a PNG's bytes (tests/test_imaging.py).
JPEG = {"quality": 95, "subsampling": 0}


def save_image(path: str | os.PathLike, image) -> Path:
    """Save a PIL image (or an HxWx3 / HxW uint8 array) atomically, as PNG or, for a ``.jpg`` path, as
    :data:`JPEG` says."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        image.convert("RGB").save(buf, format="JPEG", **JPEG)
    else:
        image.save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())


def save_figure(path: str | os.PathLike, fig, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically. convscope draws on bare ``Figure`` objects (no pyplot, so no
    GUI backend is touched and nothing is left open); a pyplot figure is closed after saving."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    manager = getattr(fig.canvas, "manager", None)
    if manager is not None:  # made by pyplot: let pyplot forget it
        import matplotlib.pyplot as plt

        plt.close(fig)
    return write_bytes(path, buf.getvalue())


def remove(path: str | os.PathLike) -> None:
    """Delete a file convscope wrote (a finished scan's resume state, say); no error if it is gone."""
    Path(path).unlink(missing_ok=True)
