"""The data-set scan (Fig. 2) against a plain forward pass over the same batches, and the cost of the Fig. 2
projections per unit, in forward-images.

    python benchmarks/scan.py

Both run under the allocator setting of every ``convscope`` command (:mod:`convscope.cpu`), which makes
the plain forward faster too. Targets: scan time / plain forward time <= 1.0 (issue 4; issue 17 aims at 0.6);
the projection job per unit (its 9 top images, one forward and one backward for all units at once) in units of
one image's forward pass.
"""

import time

import torch

import convscope as cs
from convscope.data import ImageSet
from convscope.topk import scan
from convscope.views import unit_views


def _median(f, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def plain_forward(model, data: ImageSet, batch: int) -> float:
    """The median time of a plain forward pass of ``data`` in batches of ``batch`` (after one to warm up)."""

    def forward():
        with torch.inference_mode():
            for start in range(0, len(data), batch):
                model(data.batch(torch.arange(start, min(start + batch, len(data))))[0])

    forward()  # warm up
    return _median(forward)


def bench(name: str, n_images: int, batch: int, units: int) -> None:
    torch.manual_seed(0)
    model = cs.create_model(name, num_classes=10).eval()
    s = model.input_size
    data = ImageSet((torch.rand(n_images, 3, s, s) * 255).to(torch.uint8), torch.zeros(n_images).long(),
                    [str(i) for i in range(10)])
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    t_fwd = plain_forward(model, data, batch)
    t_scan = _median(lambda: scan(model, data, layers, k=9, batch_size=batch, progress=False))
    topk = scan(model, data, layers, k=9, batch_size=batch, progress=False)
    t_one = t_fwd / n_images
    t_views = _median(lambda: unit_views(model, data, topk, "conv5", torch.arange(units)), repeats=1)
    print(f"{name} ({s} px), {n_images} images, batch {batch}, {torch.get_num_threads()} threads")
    print(f"  scan of {len(layers)} layers / plain forward over the same batches: {t_scan / t_fwd:.2f} "
          f"(target <= 1.0; forward {t_fwd:.2f} s, scan {t_scan:.2f} s)")
    print(f"  Fig. 2 projections of conv5: {t_views / units / t_one:.1f} forward-images per unit "
          f"({units} units x 9 images, crops included)")


if __name__ == "__main__":
    from convscope.cpu import keep_freed_memory

    print(f"the convscope command's allocator setting (freed memory kept): {keep_freed_memory()}")
    bench("zfnet_small", 2000, 128, 64)
    bench("zfnet", 128, 32, 16)
