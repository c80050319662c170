"""Occlusion sensitivity speed (paper Fig. 7) as ratios: to N plain forward passes and to Captum.

One 224 px image through an untrained ``zfnet`` (1000 classes), a 32 px square with stride 8: N = 25 x 25 = 625
occluder positions. convscope computes all of Fig. 7's panels (total activation of the conv5 map, its
projection, p(correct class), most probable class) from one forward pass per position plus one projection;
Captum's ``Occlusion`` gives only p(correct class). Plain forwards: the N occluded images through the full
net, eval, inference mode, in the same batches.

Run: python benchmarks/occlusion.py   (one timing each, after a warm-up; torch's default thread count. On a
shared machine the load of other processes moves every number: read the ratios, not the seconds.)
"""

from __future__ import annotations

import time
import warnings

import torch
from captum.attr import Occlusion

import convscope as cs
from convscope.occlusion import as_fill, occlude, occlusion, square_positions

SIZE, STRIDE, BATCH = 32, 8, 64


def main() -> None:
    torch.manual_seed(0)
    model = cs.create_model("zfnet", 1000).eval()
    image = torch.rand(3, 224, 224)
    label = int(model(image[None]).argmax())
    corners = square_positions(224, 224, SIZE, STRIDE).flatten(0, 1)
    fill = as_fill(None, model, image)
    n = len(corners)

    def plain() -> None:
        with torch.inference_mode():
            for start in range(0, n, BATCH):
                model(occlude(image, corners[start : start + BATCH], SIZE, fill))

    def ours() -> None:
        occlusion(model, image, label, size=SIZE, stride=STRIDE, fill=fill, batch_size=BATCH)

    def captum() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Occlusion(lambda x: model(x).softmax(-1)[:, label]).attribute(
                image[None], sliding_window_shapes=(3, SIZE, SIZE), strides=(3, STRIDE, STRIDE),
                baselines=fill.view(1, 3, 1, 1).expand(1, 3, 224, 224), perturbations_per_eval=BATCH)

    occlusion(model, image, label, size=224 - 16, stride=16, fill=fill)  # warm-up: allocator, oneDNN caches
    times = {}
    for name, fn in (("plain", plain), ("convscope", ours), ("captum", captum)):
        start = time.perf_counter()
        with torch.no_grad() if name == "captum" else torch.enable_grad():
            fn()
        times[name] = time.perf_counter() - start
    print(f"zfnet 224 px, {SIZE} px square, stride {STRIDE}: N = {n} positions, batches of {BATCH}, "
          f"{torch.get_num_threads()} threads")
    print(f"  {n} plain forwards: {times['plain']:.1f} s")
    print(f"  convscope occlusion (all panels): {times['convscope']:.1f} s = "
          f"{times['convscope'] / times['plain']:.2f} x N forwards")
    print(f"  captum Occlusion (p(correct) only): {times['captum']:.1f} s = "
          f"{times['captum'] / times['plain']:.2f} x N forwards")
    print(f"  convscope / captum: {times['convscope'] / times['captum']:.2f}")


if __name__ == "__main__":
    main()
