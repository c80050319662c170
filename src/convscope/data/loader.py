"""Batches in a given order, decoded in worker processes.

Every loop over images in convscope (the scan, training, evaluation) asks for batches by index: a chunk of the
seeded order. :func:`batches` yields ``(images, labels)`` for each chunk in the order given; with ``workers`` > 0
the chunks are fetched by a ``torch.utils.data.DataLoader`` with that many worker processes, which keeps the
order, so the result is the same as with none. It pays where fetching costs: an ImageFolder decoded from disk
(:class:`~convscope.data.folder.FolderDataset`); an in-memory :class:`~convscope.data.ImageSet` is only indexed.

An error a worker meets (an unreadable image) is sent back as a value and raised here as it was raised there,
so the message names the file rather than a worker's traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConvscopeError, check_int


def fetch(data, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (float in [0, 1]) and labels of ``data``'s items ``index``: its ``batch`` where it has one, else
    item by item (any data set of ``(image, label)``)."""
    if hasattr(data, "batch"):
        x, labels = data.batch(index)
        return x, torch.as_tensor(labels)
    items = [data[int(i)] for i in index]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


class _Chunks(Dataset):
    """Item ``i``: the batch of chunk ``i``, or the :class:`ConvscopeError` that fetching it raised."""

    def __init__(self, data, chunks: Sequence[torch.Tensor], fn=fetch):
        self.data, self.chunks, self.fn = data, chunks, fn

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        try:
            return self.fn(self.data, self.chunks[i])
        except ConvscopeError as e:
            return e


def batches(data, chunks: Sequence[torch.Tensor], workers: int = 0, fn=fetch) -> Iterator:
    """``fn(data, chunk)`` (default :func:`fetch`: images and labels) for each chunk of indices, in order;
    computed in ``workers`` processes (0: in this one)."""
    check_int(workers, "workers", 0, 1024)
    if workers == 0 or len(chunks) <= 1:
        for chunk in chunks:
            yield fn(data, chunk)
        return
    # a generator of its own: the workers' seeds are then not drawn from the global one, which seeds dropout
    loader = DataLoader(_Chunks(data, chunks, fn), batch_size=None, shuffle=False,
                        num_workers=min(workers, len(chunks)), prefetch_factor=2,
                        generator=torch.Generator().manual_seed(0))
    for item in loader:
        if isinstance(item, ConvscopeError):
            raise item
        yield item


def uint8_batches(data, workers: int = 0, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """``data``'s images as uint8 (N, 3, H, W) batches: an in-memory set's tensor as it is, another set's decoded
    ``batch_size`` at a time by ``workers`` processes (and brought back to the bytes of its files)."""
    if isinstance(getattr(data, "images", None), torch.Tensor):
        yield data.images
        return
    chunks = [torch.arange(start, min(start + batch_size, len(data))) for start in range(0, len(data), batch_size)]
    for x, _ in batches(data, chunks, workers):
        yield (x * 255).round().to(torch.uint8)


__all__ = ["batches", "fetch", "uint8_batches"]
