"""Deconvnet projection speed (paper section 2.1) as ratios to a plain forward pass and to Captum.

(a) the top-9 job: 32 images, each with its own conv5 target (its strongest activation of its own map);
    ratio = time of the projections / time of a plain forward of the same 32 images (full net, eval, no_grad),
    i.e. "forward-images per projection". Captum: one NeuronDeconvolution call with a callable selector that
    picks each image's own unit (seeded with 1; the seed value does not change the cost).
(b) every conv5 map of one image: time for all maps / number of maps / time of one forward of one image.
    Captum: a loop of NeuronDeconvolution calls, one per map, timed on a subset of maps and extrapolated.

Run: python benchmarks/projection.py   (medians of several repeats; torch's default thread count)
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from captum.attr import NeuronDeconvolution

import convscope as cs
from convscope.deconvnet import Projector

BATCH, REPEATS, CAPTUM_SUBSET = 32, 5, 8


def medians(jobs: dict, repeats: int = REPEATS) -> dict:
    """Median wall time per unit of each job ``name: (fn, units)``. The jobs take turns within every repeat,
    and a short job (one forward) runs ``units`` times per sample to last about as long as the others, so
    that a change of the machine's load (other processes on a shared machine) hits them all alike."""
    times: dict = {name: [] for name in jobs}
    for fn, _ in jobs.values():
        fn()  # warm-up: allocator, oneDNN primitive caches
    for _ in range(repeats):
        for name, (fn, units) in jobs.items():
            start = time.perf_counter()
            for _ in range(units):
                fn()
            times[name].append((time.perf_counter() - start) / units)
    return {name: statistics.median(ts) for name, ts in times.items()}


def conv5_targets(model, x):
    _, module = cs.resolve_layer(model, "conv5")
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    act = seen[0]
    chans = torch.arange(len(x)) % act.shape[1]
    flat = act[torch.arange(len(x)), chans].flatten(1).argmax(1)
    return chans, flat // act.shape[3], flat % act.shape[3]


def bench(name: str) -> None:
    torch.manual_seed(0)
    model = cs.create_model(name, init="he").eval()
    size = model.input_size
    x = torch.rand(BATCH, 3, size, size)
    proj = Projector(model, rule="deconvnet")
    _, module = cs.resolve_layer(model, "conv5")
    captum = NeuronDeconvolution(model, module)

    def forward(images):
        with torch.no_grad():
            model(images)

    chans, rows, cols = conv5_targets(model, x)
    selector = lambda out: out[torch.arange(len(out)), chans, rows, cols]  # noqa: E731
    n_maps = model.spec.widths[4]

    def captum_loop():
        for c in range(CAPTUM_SUBSET):
            captum.attribute(x[:1], neuron_selector=(c, 0, 0))

    # (a) one forward and one backward for the whole batch, every image its own channel
    t = medians(
        {
            "forward": (lambda: forward(x), 1),
            "convscope": (lambda: proj.project(x, "conv5", channel=chans), 1),
            "captum": (lambda: captum.attribute(x, neuron_selector=selector), 1),
        }
    )
    fwd_batch, t_a, t_a_captum = t["forward"], t["convscope"], t["captum"]
    # (b) every conv5 map of one image
    t = medians(
        {
            "forward": (lambda: forward(x[:1]), n_maps // 4),
            "convscope": (lambda: proj.project_channels(x[0], "conv5", range(n_maps)), 1),
            "captum": (captum_loop, 1),
        },
        3,
    )
    fwd_one, t_b, t_b_captum = t["forward"], t["convscope"], t["captum"] / CAPTUM_SUBSET * n_maps

    print(
        f"\n{name} at {size}px, {torch.get_num_threads()} threads; plain forward: "
        f"{fwd_batch / BATCH * 1e3:.1f} ms/image at batch {BATCH}, {fwd_one * 1e3:.1f} ms at batch 1"
    )
    print(
        f"  (a) {BATCH} images, own conv5 target each: {t_a / fwd_batch:.2f} forward-images per projection "
        f"(target <= 1.9); Captum {t_a_captum / fwd_batch:.2f}; convscope / Captum {t_a / t_a_captum:.2f}"
    )
    print(
        f"  (b) all {n_maps} conv5 maps of one image: {t_b / n_maps / fwd_one:.2f} one-image forwards/map "
        f"(target <= 1.0 at 224); Captum {t_b_captum / n_maps / fwd_one:.2f} (timed on {CAPTUM_SUBSET} maps, "
        f"extrapolated to {n_maps}); convscope / Captum {t_b / t_b_captum:.2f}"
    )


if __name__ == "__main__":
    from convscope.cpu import keep_freed_memory

    print(f"the convscope command's allocator setting (freed memory kept): {keep_freed_memory()}")
    warnings.simplefilter("ignore")
    for net in ("zfnet", "zfnet_small"):
        bench(net)
