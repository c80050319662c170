"""convscope at a user's scale (issue 29): a ResNet-50 in torchvision's layout (random weights) attached to
generated JPEG folders of 1,000 and 4,000 images at 224 px; the scan of its five stages and the drawing of a
fixed set of units under the three rules, each folder size in a process of its own, so that the peak memory
measured is that size's.

    python benchmarks/scale.py [--sizes 1000,4000] [--units 4] [--max-memory 2G]

Per size: the time of each phase (decode: every image decoded once, as the scan does again while it streams
the folder; scan: every unit's top 9 over it; draw: the projections and patches; write: the pictures encoded and
written), the peak resident memory of the process, the disk per unit drawn (its pictures under every rule, its
patches and its thumbnail), and the forward-images per projection (the images pushed through the model while
drawing, a crop counted by its share of the image's area, over the projections made). Then the viewer's layer
page of the 2,048 units of ``layer4`` and a unit page under three rules (the first unit's pictures copied to all).
The last line reads ``scale: memory growth G, kB per unit K, fwd-images per projection P`` (G: the peak at the
largest size over the peak at the smallest).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZE = 224
RULES = "deconvnet,guided,gradient"


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block, its module names and shapes (so its state dicts would load)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stages.append(nn.Sequential(*(Bottleneck(cin if b == 0 else width * 4, width, stride if b == 0 else 1)
                                          for b in range(blocks))))
            cin = width * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    """``n`` JPEGs of 224 px in ``classes`` class folders: smooth random colour fields with a few discs (what
    photographs compress like, not noise)."""
    from PIL import Image, ImageDraw

    g = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = g.uniform(0, 255, (7, 7, 3)).astype(np.uint8)
        image = Image.fromarray(low).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y, r = g.integers(0, SIZE, 2).tolist() + [int(g.integers(8, 40))]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(g.integers(0, 256, 3).tolist()))
        image.save(folder / f"{i:05d}.jpg", quality=90)


def child(root: str, out: str, units: int, max_memory: str | None = None) -> dict:
    """One size: attach, read, scan, draw, write; the phases' times, the peak memory, disk and forward counts."""
    import convscope as cs
    from convscope.cpu import keep_freed_memory
    from convscope.units import compute, write_scan

    keep_freed_memory()
    torch.manual_seed(0)
    run = cs.attach(ResNet50(num_classes=10).eval(), "folder", out, data_root=root, image_size=SIZE,
                    normalize="imagenet")
    times = {}
    data = run.split(run.default_split("val"), stream=True)  # as the scan reads it: decoded batch by batch
    t0 = time.perf_counter()
    for start in range(0, len(data), 128):
        data.batch(torch.arange(start, min(start + 128, len(data))))
    times["decode"] = time.perf_counter() - t0  # once more inside the scan, which decodes as it goes
    t0 = time.perf_counter()
    result = compute(run, units=units, rule=RULES, max_memory=max_memory, progress=False)
    times["scan"] = time.perf_counter() - t0
    pushed = [0.0]

    def count(module, args):  # the images entering the model while drawing, a crop by its share of the area
        x = args[0]
        pushed[0] += x.shape[0] * x.shape[-2] * x.shape[-1] / (SIZE * SIZE)

    drawing, draw = [0.0], result.draw

    def timed(*args):
        t = time.perf_counter()
        try:
            return draw(*args)
        finally:
            drawing[0] += time.perf_counter() - t

    result.draw = timed
    hook = run.model.conv1.register_forward_pre_hook(count)
    t0 = time.perf_counter()
    paths = write_scan(result, run.layout, progress=False)
    total = time.perf_counter() - t0
    hook.remove()
    times["draw"], times["write"] = drawing[0], total - drawing[0]
    drawn = sum(len(u) for u in result.units.values())
    tiles = [p for p in paths if p.suffix != ".safetensors" and "units" in p.parts]
    return {"images": len(data), "times": times, "units": drawn,
            "projections": drawn * result.topk.k * len(result.rules),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "kb_per_unit": sum(p.stat().st_size for p in tiles) / drawn / 1000, "pushed": pushed[0],
            "layers": list(result.units)}


def viewer_times(run: Path, layer: str = "layer4", repeats: int = 5) -> tuple[int, float, float]:
    """Every unit of ``layer`` given the pictures of its first drawn one (under every rule), then the viewer's
    layer page of them and a unit page under another rule served by its app (in this process): the units and
    each page's median time in ms."""
    from starlette.testclient import TestClient

    from convscope.layout import Layout
    from convscope.topk import load_topk
    from convscope.viewer import make_app

    layout = Layout(run)
    n = load_topk(layout.topk)[0].values[layer].shape[0]
    folder = layout.units / layer
    drawn = sorted(folder.rglob("unit_*.jpg"))
    first = drawn[0].name
    for source in (p for p in drawn if p.name == first):
        for u in range(n):
            target = source.with_name(f"unit_{u:04d}.jpg")
            if not target.exists():
                shutil.copyfile(source, target)
    client = TestClient(make_app(run), base_url="http://127.0.0.1")

    def median(url: str) -> float:
        assert client.get(url).status_code == 200  # and warmed up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.get(url)
            times.append(time.perf_counter() - t0)
        return 1000 * sorted(times)[len(times) // 2]

    return n, median(f"/layer/{layer}"), median(f"/layer/{layer}/unit/{n // 2}?rule=guided")


def main(sizes: list[int], units: int, max_memory: str | None = None) -> None:
    work = Path(tempfile.mkdtemp(prefix="convscope-scale-"))
    try:
        rows = []
        for n in sizes:
            root = work / f"images_{n}"
            make_folder(root, n)
            line = subprocess.run([sys.executable, __file__, "--child", str(root), str(work / f"run_{n}"), str(units),
                                   *(["--max-memory", max_memory] if max_memory else [])],
                                  check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            rows.append(json.loads(line))
            r = rows[-1]
            t = r["times"]
            print(f"{r['images']} images ({SIZE} px), {r['units']} units of {', '.join(r['layers'])} under {RULES}: "
                  f"decode {t['decode']:.1f} s, scan {t['scan']:.1f} s, draw {t['draw']:.1f} s, "
                  f"write {t['write']:.1f} s; peak {r['peak_gb']:.2f} GB; {r['kb_per_unit']:.0f} kB per unit; "
                  f"{r['pushed'] / r['projections']:.2f} forward-images per projection", flush=True)
            shutil.rmtree(root)
        n, layer_ms, unit_ms = viewer_times(work / f"run_{sizes[0]}")
        print(f"viewer: a layer page of {n} units {layer_ms:.0f} ms, a unit page under three rules {unit_ms:.0f} ms "
              "(the median of 5 requests; goal under 100 ms)")
        growth = rows[-1]["peak_gb"] / rows[0]["peak_gb"]
        kb = max(r["kb_per_unit"] for r in rows)
        fwd = rows[-1]["pushed"] / rows[-1]["projections"]
        print(f"scale: memory growth {growth:.2f}, kB per unit {kb:.0f}, fwd-images per projection {fwd:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,4000")
    parser.add_argument("--units", type=int, default=4, help="units drawn per stage")
    parser.add_argument("--max-memory", help="the scan's budget (default: its own, a quarter of the machine's)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), args.max_memory)))
    else:
        main([int(s) for s in args.sizes.split(",")], args.units, args.max_memory)
