"""Network dissection of every unit of conv1..conv5 of ``zfnet`` (1,376 units) at 224 px against a plain forward
pass over the same images and batches (issue 28: goal at most 2.0). The dissection is timed whole: its one
forward pass (keeping each unit's top values) and the IoU from the pixels above the thresholds; the rendering of
the concept masks is not (it is cached with the images), nor is the check by cause (it forwards only labelled
units' images).

    python benchmarks/dissect.py

Random weights (the seed's), the embedded validation images at 224 px and their rendered concepts. The last line
reads ``dissect/forward R``.
"""

import time

import torch

import convscope as cs
from convscope.data.synthetic import load_synthetic
from convscope.dissect import dissect, embedded_concepts


def _median(f, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(n_images: int = 128, batch: int = 32) -> float:
    torch.manual_seed(0)
    model = cs.create_model("zfnet", num_classes=12).eval()
    data = load_synthetic("val", n=n_images, size=224)
    concepts = embedded_concepts(data)
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5"]

    def forward():
        with torch.inference_mode():
            for start in range(0, n_images, batch):
                model(data.batch(torch.arange(start, min(start + batch, n_images)))[0])

    forward()  # warm up
    t_fwd = _median(forward)
    t_dissect = _median(lambda: dissect(model, layers, data, concepts, batch_size=batch, progress=False), repeats=1)
    units = sum(d.thresholds.numel() for d in dissect(model, ["conv1"], data, concepts, batch_size=batch,
                                                            progress=False).values())
    print(f"zfnet (224 px), {n_images} images, batch {batch}, {torch.get_num_threads()} threads, conv1 {units} units")
    print(f"  plain forward {t_fwd:.2f} s; dissection of conv1..conv5 {t_dissect:.2f} s")
    ratio = t_dissect / t_fwd
    print(f"dissect/forward {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    from convscope.cpu import keep_freed_memory

    print(f"the convscope command's allocator setting (freed memory kept): {keep_freed_memory()}")
    main()
