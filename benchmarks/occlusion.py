"""Occlusion sensitivity speed (paper Fig. 7) as ratios: to N plain forward passes and to Captum.

One 224 px image through an untrained ``zfnet`` (1000 classes), a 32 px square with stride 8: N = 25 x 25 = 625
occluder positions. convscope computes all of Fig. 7's panels (total activation of the conv5 map, its
projection, p(correct class), most probable class) three ways: densely (one full forward pass per position),
incrementally (Krypton: each layer recomputed only where the square reaches it; exact) and approximately
(Krypton's projective-field threshold), each plus one projection. Captum's ``Occlusion`` gives only
p(correct class); it runs at the fastest of a few ``perturbations_per_eval``. Plain forwards: the N occluded
images through the full net, eval, inference mode, in batches of 64. The approximate maps' largest error is
measured against the exact ones, relative to the largest value of each map.

Run: python benchmarks/occlusion.py   (one timing each, after a warm-up; torch's default thread count. On a
shared machine the load of other processes moves every number: read the ratios, not the seconds. The last line
is ``exact/captum R``.)
"""

from __future__ import annotations

import time
import warnings

import torch
from captum.attr import Occlusion

import convscope as cs
from convscope import incremental
from convscope.layers import site
from convscope.occluders import as_fill, occlude, square_positions
from convscope.occlusion import occlusion

SIZE, STRIDE, BATCH = 32, 8, 64
CAPTUM_BATCHES = (16, 64, 256)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def multiply_adds(model, image, corners, fill) -> tuple[float, float]:
    """The incremental engine's multiply-adds, exact and approximate, as fractions of the dense passes'."""
    patch = fill.view(3, 1, 1).expand(3, SIZE, SIZE)
    engine, _ = incremental.engine(model, image, site(model, "conv5"), patch, corners)
    fractions = []
    for tau in (None, incremental.TAU):
        engine.macs = 0
        for start in range(0, len(corners), BATCH):
            engine(corners[start : start + BATCH], patch, tau)
        fractions.append(engine.macs / (engine.dense_macs * len(corners)))
    return fractions[0], fractions[1]


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

    def ours(method: str, approx: bool = False):
        return lambda: occlusion(model, image, label, size=SIZE, stride=STRIDE, fill=fill, batch_size=BATCH,
                                 method=method, approx=approx)

    def captum(per_eval: int):
        def run() -> None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                Occlusion(lambda x: model(x).softmax(-1)[:, label]).attribute(
                    image[None], sliding_window_shapes=(3, SIZE, SIZE), strides=(3, STRIDE, STRIDE),
                    baselines=fill.view(1, 3, 1, 1).expand(1, 3, 224, 224), perturbations_per_eval=per_eval)

        return run

    for method in ("dense", "incremental"):  # warm-up: allocator, oneDNN caches
        occlusion(model, image, label, size=224 - 16, stride=16, fill=fill, method=method)
    times, results = {}, {}
    times["plain"], _ = timed(plain)
    for name, method, approx in (("dense", "dense", False), ("exact", "incremental", False),
                                 ("approx", "incremental", True)):
        times[name], results[name] = timed(ours(method, approx))
    captum_times = {b: timed(captum(b))[0] for b in CAPTUM_BATCHES}
    best = min(captum_times, key=captum_times.get)
    times["captum"] = captum_times[best]

    macs = multiply_adds(model, image, corners, fill)
    exact, approx = results["exact"], results["approx"]
    dense = results["dense"]
    agree = max(float((exact.prob - dense.prob).abs().max() / dense.prob.abs().max()),
                float((exact.activation - dense.activation).abs().max() / dense.activation.abs().max()))
    err_prob = float((approx.prob - exact.prob).abs().max() / exact.prob.abs().max())
    err_act = float((approx.activation - exact.activation).abs().max() / exact.activation.abs().max())
    print(f"zfnet 224 px, {SIZE} px square, stride {STRIDE}: N = {n} positions, batches of {BATCH}, "
          f"{torch.get_num_threads()} threads")
    print(f"  {n} plain forwards: {times['plain']:.1f} s")
    for name, text in (("dense", "convscope dense (all panels)"),
                       ("exact", "convscope exact incremental (all panels)"),
                       ("approx", "convscope approx incremental (all panels)")):
        print(f"  {text}: {times[name]:.1f} s = {times[name] / times['plain']:.2f} x N forwards")
    print("  captum Occlusion (p(correct) only), perturbations_per_eval "
          + ", ".join(f"{b}: {t:.1f} s" for b, t in captum_times.items())
          + f"; best {best} = {times['captum'] / times['plain']:.2f} x N forwards")
    print(f"  method used: exact {exact.method!r}, approx {approx.method!r}")
    print(f"  multiply-adds of the convolutions and linear layers, of N dense forwards: exact {macs[0]:.2f}, "
          f"approx {macs[1]:.2f}")
    print(f"  exact vs dense: largest difference {agree:.1e} of the largest value")
    print(f"  approx vs exact: largest error {err_prob:.3f} (p(correct)), {err_act:.3f} (conv5 map total), "
          "each of the map's largest value")
    print(f"  exact/plain {times['exact'] / times['plain']:.2f}, approx/plain {times['approx'] / times['plain']:.2f}"
          f", dense/captum {times['dense'] / times['captum']:.2f}, approx/captum "
          f"{times['approx'] / times['captum']:.2f}")
    print(f"exact/captum {times['exact'] / times['captum']:.2f}")


if __name__ == "__main__":
    from convscope.cpu import keep_freed_memory

    print(f"the convscope command's allocator setting (freed memory kept): {keep_freed_memory()}")
    main()
