"""The scan on several processes (torch.distributed, gloo on the CPU) against one process, and with DataLoader
workers decoding an ImageFolder of JPEGs against none, as images per second.

The same scan (zfnet_small at 64 px, conv1..conv5, k=9, per-class statistics on) of N random images three ways:
one process with one thread, one process with every core's thread (torch's default), and P processes of one
thread each, every rank scanning its shard and the partials merged by all_gather (what `torchrun
--nproc-per-node P -m convscope scan` runs). Each is timed after a warm-up; the ratio is P processes over one
process with all threads.

Then the scan of an ImageFolder of M JPEGs (500 x 375 px, ImageNet's usual size) read lazily, each batch decoded
as it is needed (what a tree too large for memory gets), with ``--workers`` 0 and W (what `convscope scan RUN
--workers W` runs); the result is the same, the ratio is W workers over none.

Run: python benchmarks/distributed.py [--images N] [--processes P] [--jpegs M] [--workers W]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def setup(n: int):
    from convscope.data import ImageSet
    from convscope.models import create_model

    torch.manual_seed(0)
    model = create_model("zfnet_small", num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)
    return model, ImageSet(images, torch.arange(n) % 10, [str(i) for i in range(10)])


def one(n: int, threads: int) -> float:
    from convscope.topk import scan

    torch.set_num_threads(threads)
    model, data = setup(n)
    scan(model, data.subset(range(256)), LAYERS, k=9, progress=False, class_k=25)  # warm-up
    t = time.perf_counter()
    scan(model, data, LAYERS, k=9, progress=False, class_k=25)
    return n / (time.perf_counter() - t)


def rank(r: int, world: int, port: int, n: int, out: str) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from convscope import distributed
    from convscope.topk import scan

    group = distributed.init()
    model, data = setup(n)
    scan(model, data.subset(range(256)), LAYERS, k=9, progress=False, class_k=25)  # warm-up (one shard each)
    distributed.barrier(group)
    t = time.perf_counter()
    scan(model, data, LAYERS, k=9, progress=False, class_k=25, group=group)
    if group.main:
        with open(out, "w") as f:
            f.write(str(n / (time.perf_counter() - t)))


def several(n: int, world: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        procs = [ctx.Process(target=rank, args=(r, world, port, n, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        return float(open(out).read())


def jpeg_tree(root: str, n: int) -> None:
    """``n`` JPEGs of 500 x 375 px in 10 class folders: smooth colour fields with noise, as costly to decode as
    photographs of that size."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500] / 100.0
    for i in range(n):
        folder = os.path.join(root, f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        a, b, c = g.uniform(0.5, 3, 3)
        field = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy / 4)], -1)
        pixels = np.clip(127 + 100 * field + g.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def folder(root: str, workers: int) -> float:
    from convscope.data.folder import FolderDataset
    from convscope.models import create_model
    from convscope.topk import scan

    torch.manual_seed(0)
    model = create_model("zfnet_small", num_classes=10).eval()
    data = FolderDataset(root, 64)
    scan(model, data.subset(range(128)), LAYERS, k=9, progress=False, class_k=25, workers=workers)  # warm-up
    t = time.perf_counter()
    scan(model, data, LAYERS, k=9, progress=False, class_k=25, workers=workers)
    return len(data) / (time.perf_counter() - t)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--jpegs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    single = one(args.images, 1)
    threaded = one(args.images, cores)
    multi = several(args.images, args.processes)
    print(f"scan of {args.images} images, zfnet_small at 64 px, conv1..conv5, on {cores} cores:")
    print(f"| 1 process, 1 thread | {single:.0f} img/s |")
    print(f"| 1 process, {cores} threads | {threaded:.0f} img/s |")
    print(f"| {args.processes} processes (torch.distributed, gloo), 1 thread each | {multi:.0f} img/s |")
    print(f"{args.processes} processes / 1 process with {cores} threads: {multi / threaded:.2f}x; "
          f"/ 1 thread: {multi / single:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        jpeg_tree(tmp, args.jpegs)
        torch.set_num_threads(cores)
        none, some = folder(tmp, 0), folder(tmp, args.workers)
    print(f"\nscan of an ImageFolder of {args.jpegs} JPEGs (500 x 375 px) read at 64 px, decoded batch by batch:")
    print(f"| --workers 0 (decoded in the scanning process) | {none:.0f} img/s |")
    print(f"| --workers {args.workers} (DataLoader worker processes) | {some:.0f} img/s |")
    print(f"--workers {args.workers} / --workers 0: {some / none:.2f}x")
