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
from scan import plain_forward  # benchmarks/ is the script's folder, so on its path

import convscope as cs
from convscope.data.synthetic import load_synthetic
from convscope.dissect import dissect, embedded_concepts


def main(n_images: int = 128, batch: int = 32) -> float:
    torch.manual_seed(0)
    model = cs.create_model("zfnet", num_classes=12).eval()
    data = load_synthetic("val", n=n_images, size=224)
    concepts = embedded_concepts(data)
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    t_fwd = plain_forward(model, data, batch)
    t0 = time.perf_counter()
    found = dissect(model, layers, data, concepts, batch_size=batch, progress=False)
    t_dissect = time.perf_counter() - t0
    units = sum(d.thresholds.numel() for d in found.values())
    print(f"zfnet (224 px), {n_images} images, batch {batch}, {torch.get_num_threads()} threads, {units} units")
    print(f"  plain forward {t_fwd:.2f} s; dissection of conv1..conv5 {t_dissect:.2f} s")
    ratio = t_dissect / t_fwd
    print(f"dissect/forward {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    from convscope.cpu import keep_freed_memory

    print(f"the convscope command's allocator setting (freed memory kept): {keep_freed_memory()}")
    main()
