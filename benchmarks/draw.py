"""Drawing every unit (paper Fig. 2 for all conv units, ``convscope scan``) as forward-images per projection.

For each model, a scan of N random images, then every conv unit's top-9 projected (``views.unit_views``, the
code ``convscope scan`` runs: crops of each unit's receptive field, batched across units and images).
ratio = time of all the projections / (number of projections x time of a plain forward of one image, the full
net in eval mode under no_grad, batched). The goal is at most 1.0. Beside it, the same projections from whole
images (the crop switched off), the time to write one unit's page (its projections, patches and thumbnail, as
``convscope scan`` writes them) and the time the viewer takes to answer one unit page.

Run: python benchmarks/draw.py [--units N]   (N units per layer, a seeded sample; default all)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import convscope.views as views_module
from convscope import artifacts
from convscope.data import ImageSet
from convscope.layout import Layout
from convscope.models import create_model
from convscope.topk import scan
from convscope.views import patch_grid, projection_grid, select_units, thumbnail, unit_views

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def forward_time(model, x: torch.Tensor, repeats: int = 3) -> float:
    """Seconds of a plain forward per image (batches of 32, median of ``repeats``)."""
    times = []
    with torch.no_grad():
        model(x[:32])
        for _ in range(repeats):
            t = time.perf_counter()
            for i in range(0, len(x), 32):
                model(x[i:i + 32])
            times.append((time.perf_counter() - t) / len(x))
    return sorted(times)[len(times) // 2]


def draw(model, data, topk, chosen: dict, whole: bool) -> tuple[float, dict]:
    """Seconds to project every chosen unit's top-9, per layer (crops off when ``whole``)."""
    window = views_module._window
    if whole:
        views_module._window = lambda box, size, field, step: (0, 0, *size)
    try:
        out = {}
        for layer, which in chosen.items():
            t = time.perf_counter()
            views = unit_views(model, data, topk, layer, which)
            out[layer] = (time.perf_counter() - t, views)
        return sum(t for t, _ in out.values()), out
    finally:
        views_module._window = window


def bench(name: str, n_images: int, n_units: int | None) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    size = model.input_size
    g = torch.Generator().manual_seed(0)
    model.normalize.mean.copy_(torch.rand(3, size, size, generator=g) * 0.2 + 0.4)  # a per-pixel mean, as trained
    images = torch.randint(0, 256, (n_images, 3, size, size), generator=g, dtype=torch.uint8)
    data = ImageSet(images, torch.arange(n_images) % 10, [str(i) for i in range(10)])
    topk = scan(model, data, LAYERS, k=9, batch_size=32, progress=False)
    chosen = {layer: select_units(topk.values[layer].shape[0], n_units) for layer in LAYERS}
    n_proj = sum(len(u) * 9 for u in chosen.values())
    t_fwd = forward_time(model, data.batch(torch.arange(min(n_images, 96)))[0])
    t_crop, per_layer = draw(model, data, topk, chosen, whole=False)
    print(f"\n{name} at {size} px: {n_proj} projections ({sum(len(u) for u in chosen.values())} units x 9), "
          f"plain forward {1000 * t_fwd:.2f} ms/image")
    print("| layer | units | from crops | forward-images per projection |")
    print("|---|---|---|---|")
    for layer, (t, views) in per_layer.items():
        n = views.projections.shape[0] * 9
        print(f"| {layer} | {len(views.units)} | {views.cropped}/{n} | {t / (n * t_fwd):.2f} |")
    sample = {layer: u[select_units(len(u), 16)] for layer, u in chosen.items()}
    n_sample = sum(len(u) * 9 for u in sample.values())
    t_sample, _ = draw(model, data, topk, sample, whole=False)
    t_whole, _ = draw(model, data, topk, sample, whole=True)
    print(f"all units: {t_crop / (n_proj * t_fwd):.2f} forward-images per projection (goal <= 1.0). On 16 units "
          f"a layer: from crops {t_sample / (n_sample * t_fwd):.2f}, from whole images "
          f"{t_whole / (n_sample * t_fwd):.2f} (crops {t_whole / t_sample:.1f}x faster)")
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(tmp)
        views = per_layer["conv5"][1]
        t = time.perf_counter()
        for u in range(len(views.units)):
            artifacts.save_image(layout.unit("conv5", int(views.units[u])), projection_grid(views, u))
            artifacts.save_image(layout.unit_patches("conv5", int(views.units[u])), patch_grid(views, u))
            artifacts.save_image(layout.unit_thumb("conv5", int(views.units[u])), thumbnail(views, u))
        per_page = (time.perf_counter() - t) / len(views.units)
        print(f"writing a unit's page (projections, patches, thumbnail): {1000 * per_page:.1f} ms, "
              f"{per_page / t_fwd:.1f} forward-images")
        page_time(Path(tmp), [int(u) for u in views.units[:50]])


def page_time(root: Path, units: list[int]) -> None:
    """Milliseconds for the viewer to answer one unit page (the run's files read at every request)."""
    from starlette.testclient import TestClient

    from convscope.viewer import make_app

    (root / "config.json").write_text('{"model": "zfnet_small", "data": "synthetic"}')
    client = TestClient(make_app(root), base_url="http://127.0.0.1")
    client.get(f"/layer/conv5/unit/{units[0]}")
    t = time.perf_counter()
    for u in units:
        assert client.get(f"/layer/conv5/unit/{u}").status_code == 200
    print(f"viewer: {1000 * (time.perf_counter() - t) / len(units):.1f} ms per unit page")


if __name__ == "__main__":
    from convscope.cpu import keep_freed_memory

    print(f"the convscope command's allocator setting (freed memory kept): {keep_freed_memory()}")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=None, help="units per layer (a seeded sample); default all")
    parser.add_argument("--images", type=int, default=64, help="images scanned")
    args = parser.parse_args()
    for model_name in ("zfnet_small", "zfnet"):
        bench(model_name, args.images, args.units)
