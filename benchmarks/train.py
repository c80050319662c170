"""How long the paper's recipe takes to train zfnet_small to 90% on the embedded data, on this machine.

    python benchmarks/train.py [EPOCHS]

Prints per-epoch validation accuracy and seconds, the first epoch at or above 90%, and the final test accuracy.
"""

import sys
import tempfile
import time

import torch

from convscope.config import TrainConfig
from convscope.train import load_data, train


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else TrainConfig().epochs
    cfg = TrainConfig(epochs=epochs)
    t0 = time.perf_counter()
    splits = load_data(cfg)
    t_data = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(cfg, f"{tmp}/run", splits=splits, progress=False)
        wall = time.perf_counter() - t0
    print(f"zfnet_small on synthetic ({len(splits.train)} train images, 64 px), {torch.get_num_threads()} threads")
    print(f"data: {t_data:.1f} s (generated or read from the cache)")
    elapsed, reached = 0.0, None
    for m in result.metrics:
        elapsed += m["seconds"]
        acc = 1 - m["val_top1_err"]
        if reached is None and acc >= 0.9:
            reached = (m["epoch"], elapsed)
        print(f"  epoch {m['epoch']:3d}  lr {m['lr']:.0e}  train err {m['train_top1_err']:.3f}  "
              f"val acc {acc:.3f}  {m['seconds']:.1f} s")
    print(f"training wall time {wall:.0f} s ({wall / epochs:.1f} s/epoch)")
    if reached:
        print(f"90% validation accuracy first at epoch {reached[0]}, after {reached[1]:.0f} s")
    else:
        print("90% validation accuracy not reached")
    print(f"test accuracy {1 - result.test['top1_err']:.3f}, top-5 error {result.test['top5_err']:.3f}")


if __name__ == "__main__":
    main()
