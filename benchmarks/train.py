"""Training speed on the embedded data: convscope's training step beside a plain PyTorch loop, and the time the
paper's recipe takes to reach 90% validation accuracy with zfnet_small.

    python benchmarks/train.py [EPOCHS]     (EPOCHS 0: the throughput comparison only)

Throughput: images per second of one epoch of ``convscope.train.train_epoch`` (the recipe: SGD with momentum
and weight decay, random crop and flip, the paper's filter renormalisation after every step) against a plain
loop written as a PyTorch user would, with the same model, batch, augmentation, optimiser and renormalisation,
the images already in memory. The two alternate, twice each, and the better epoch of each counts. Target
(issue 17): convscope / plain >= 0.95. Then a full training run prints per-epoch validation accuracy and
seconds, the first epoch at or above 90% and the test accuracy.
"""

import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from convscope.config import TrainConfig
from convscope.train import build_model, configure_optimizer, load_data, renormalize_filters_, train, train_epoch


def plain_epoch(model, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, optimizer,
                generator: torch.Generator) -> None:
    """One epoch as a PyTorch user writes it: shuffle, slice uint8 images, pad, crop and flip each, step."""
    model.train()
    order = torch.randperm(len(images), generator=generator)
    h, w = images.shape[-2:]
    p = cfg.crop_pad
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        x = F.pad(images[idx].float() / 255.0, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2, len(idx)), generator=generator).tolist()
        x = torch.stack([x[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
        flip = torch.rand(len(idx), generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        renormalize_filters_(model, cfg.renorm_radius)


def throughput(cfg: TrainConfig, splits) -> None:
    data = splits.train
    n = len(data)
    ours_model = build_model(cfg, splits)
    plain_model = build_model(cfg, splits)
    ours_opt, plain_opt = configure_optimizer(ours_model, cfg), configure_optimizer(plain_model, cfg)
    generator = torch.Generator().manual_seed(0)
    best = {"convscope": float("inf"), "plain": float("inf")}
    for epoch in (1, 2):
        start = time.perf_counter()
        train_epoch(ours_model, data, cfg, epoch, ours_opt, progress=False)
        best["convscope"] = min(best["convscope"], time.perf_counter() - start)
        start = time.perf_counter()
        plain_epoch(plain_model, data.images, data.labels, cfg, plain_opt, generator)
        best["plain"] = min(best["plain"], time.perf_counter() - start)
    rate = {k: n / v for k, v in best.items()}
    print(f"zfnet_small, {n} images of 64 px, batch {cfg.batch_size}, {torch.get_num_threads()} threads")
    print(f"  plain PyTorch loop: {rate['plain']:.0f} images/s")
    print(f"  convscope train_epoch: {rate['convscope']:.0f} images/s")
    print(f"  convscope/plain {rate['convscope'] / rate['plain']:.2f}")


def time_to_90(cfg: TrainConfig, splits) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(cfg, f"{tmp}/run", splits=splits, progress=False)
        wall = time.perf_counter() - t0
    elapsed, reached = 0.0, None
    for m in result.metrics:
        elapsed += m["seconds"]
        acc = 1 - m["val_top1_err"]
        if reached is None and acc >= 0.9:
            reached = (m["epoch"], elapsed)
        print(f"  epoch {m['epoch']:3d}  lr {m['lr']:.0e}  train err {m['train_top1_err']:.3f}  "
              f"val acc {acc:.3f}  {m['seconds']:.1f} s")
    print(f"training wall time {wall:.0f} s ({wall / cfg.epochs:.1f} s/epoch)")
    if reached:
        print(f"90% validation accuracy first at epoch {reached[0]}, after {reached[1]:.0f} s")
    else:
        print("90% validation accuracy not reached")
    print(f"test accuracy {1 - result.test['top1_err']:.3f}, top-5 error {result.test['top5_err']:.3f}")


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else TrainConfig().epochs
    cfg = TrainConfig()
    t0 = time.perf_counter()
    splits = load_data(cfg)
    print(f"data: {time.perf_counter() - t0:.1f} s (generated or read from the cache)")
    throughput(cfg, splits)
    if epochs:
        time_to_90(replace(cfg, epochs=epochs), splits)


if __name__ == "__main__":
    from convscope.cpu import keep_freed_memory

    print(f"the convscope command's allocator setting (freed memory kept): {keep_freed_memory()}")
    main()
