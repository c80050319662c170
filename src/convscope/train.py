"""Training with the paper's recipe (section 3), resumable and deterministic by seed.

Every epoch draws its shuffling, augmentation and dropout from generators seeded by (seed, epoch), and the full
training state is saved at the end of every epoch, so a run killed at any moment and resumed ends with weights
bit-identical to an uninterrupted run. Weights are kept at the paper's Fig. 4 epochs (1, 2, 5, 10, 20, 30, 40,
64, those within the run) for the evolution figure, and at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import artifacts, distributed
from .checkpoint import load_model, load_state, read_weights, save_state, save_weights
from .config import TrainConfig
from .cpu import channels_last_pooling
from .data import SPLITS, ImageSet, Splits
from .data.loader import batches, uint8_batches
from .data.transforms import crop_flip, draw_crop_flip, mean_and_std
from .errors import ConvscopeError, check_int, shown
from .forward import eval_mode
from .layout import Layout
from .models import create_model


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    classes: list[str]
    metrics: list[dict[str, float]]
    test: dict[str, float]


def renormalize_filters_(model: nn.Module, radius: float = 0.1) -> torch.Tensor | int:
    """Paper section 3: every conv filter whose RMS exceeds ``radius`` is rescaled to that radius (Fig. 6a
    shows why: without it a few layer-1 filters dominate). Returns how many it rescaled (a tensor on the
    model's device, read when needed). The others are multiplied by exactly 1: while none exceeds the radius,
    a run is bit for bit the run without renormalisation."""
    rescaled: torch.Tensor | int = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight.flatten(1)
                rms = w.pow(2).mean(1).sqrt()
                scale = (radius / rms.clamp_min(1e-12)).clamp(max=1.0)
                m.weight.mul_(scale.view(-1, *([1] * (m.weight.ndim - 1))))
                rescaled = rescaled + (scale < 1).sum()
    return rescaled


def _seeded(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63)


# The paper's Table 2 (ImageNet 2012): (what, top-1 error, top-5 error) in %, shown beside a run's test error.
PAPER_TABLE2: list[tuple[str, str, str]] = [("ZF single model (Fig. 3), val", "38.4", "16.5"),
                                            ("AlexNet replication, val", "40.5", "18.1"),
                                            ("ZF ensemble of 6 nets, test", "", "14.8")]
EVAL_PIXELS = 500 * 64 * 64  # an evaluation batch: 500 images of 64 px, 125 of 128 px (500 of 128 px: 0.6 GB more)


def evaluate(model: nn.Module, data: ImageSet, batch_size: int | None = None, workers: int = 0) -> dict[str, float]:
    """Loss, top-1 and top-5 error (Table 2's measures) of a model on a data set, in eval mode; ``workers``
    processes decode the images (an ImageFolder read from disk). ``batch_size`` (default: as many images as
    make :data:`EVAL_PIXELS` pixels) changes no number but the loss's last bits."""
    device = next(model.parameters()).device
    if batch_size is None:
        size = getattr(data, "image_size", None) or 64
        batch_size = max(1, EVAL_PIXELS // (size * size))
    loss = top1 = top5 = 0.0
    k = min(5, len(data.classes))
    chunks = [torch.arange(start, min(start + batch_size, len(data))) for start in range(0, len(data), batch_size)]
    with torch.no_grad(), eval_mode(model):
        for x, y in batches(data, chunks, workers):
            x, y = x.to(device), y.to(device)
            with _autocast(device):
                logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            best = logits.topk(k, dim=1).indices
            top1 += (best[:, 0] != y).sum().item()
            top5 += (best != y[:, None]).all(1).sum().item()
    n = len(data)
    return {"loss": loss / n, "top1_err": top1 / n, "top5_err": top5 / n}


def _autocast(device: torch.device):
    """The forward pass's context: bf16 autocast on CUDA; on the CPU, max-pools run channels-last
    (:func:`convscope.cpu.channels_last_pooling`: the same numbers, bit for bit, a step 0.9 of the time)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return channels_last_pooling() if device.type == "cpu" else contextlib.nullcontext()


def prepare_run(run_dir: str | Path, cfg: TrainConfig) -> bool:
    """Create the run directory, or check that the one there is this same run. Returns True when resuming.

    A directory holding a different run, or files that are not a convscope run, is refused: nothing is
    overwritten."""
    layout = Layout(run_dir)
    if check_run_dir(layout, cfg):
        return True
    artifacts.write_json(layout.config, json.loads(json.dumps(cfg.to_dict())))
    return False


def check_run_dir(layout: Layout, cfg: TrainConfig) -> bool:
    """Whether ``layout`` holds this same run (True), or is new or empty (False, when nothing is there but what a
    killed write or the lock left); anything else is refused, before anything is written there."""
    wanted = json.loads(json.dumps(cfg.to_dict()))
    if layout.config.is_file():
        try:
            have = json.loads(layout.config.read_text())
        except ValueError as e:
            raise ConvscopeError(f"{str(layout.config)!r} is corrupt ({e}); choose another run directory") from e
        if not isinstance(have, dict):
            raise ConvscopeError(f"{str(layout.config)!r} is not a run's config; choose another run directory")
        if have != wanted:
            diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
            detail = "; ".join(f"{k}: {have.get(k)!r} there, {wanted.get(k)!r} asked" for k in diff)
            raise ConvscopeError(f"run directory {str(layout.root)!r} already holds a different run ({detail}); "
                                 "choose another directory, or repeat that run's settings to resume it")
        return True
    if layout.root.exists() and (not layout.root.is_dir() or any(not artifacts.is_temp(e.name)
                                                                  for e in layout.root.iterdir())):
        raise ConvscopeError(f"{str(layout.root)!r} exists and is not an empty directory or a convscope run; "
                             "choose a new or empty directory")
    return False


def build_model(cfg: TrainConfig, splits: Splits, workers: int = 0) -> nn.Module:
    """A fresh ``cfg.model`` initialised under ``cfg.seed`` (the global generator is left as it was), its input
    normalisation set from the training set (read by ``workers`` processes where it is on disk)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, num_classes=len(splits.train.classes), **cfg.model_options)
    if hasattr(model, "normalize"):
        mean, std = mean_and_std(uint8_batches(splits.train, workers))
        if mean.shape != model.normalize.mean.shape:
            size = splits.train.image_size
            raise ConvscopeError(f"model {cfg.model!r} takes {model.input_size} px images but the data set has "
                                 f"{size} px; pass image_size={model.input_size}, or build the net for these "
                                 f'images with model_options {{"input_size": {size}}} (in a --config file)')
        model.normalize.mean.copy_(mean)
        model.normalize.std.copy_(std)
    return model


def load_data(cfg: TrainConfig, workers: int = 0) -> Splits:
    spec = cfg.data_spec()
    spec.check()
    return Splits(*(spec.load(split, workers=workers) for split in SPLITS))


def train(cfg: TrainConfig, run_dir: str | Path, splits: Splits | None = None,
          progress: bool | None = None, device: str | torch.device | None = None, workers: int = 0,
          renorm_twin: str | Path | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` into ``run_dir``, resuming if the directory holds this run already.

    ``progress=None`` shows a progress bar only on a terminal. A finished run is loaded, not retrained.
    ``device``: where to train (default ``auto``: this rank's GPU where there is one, else the CPU; see
    :func:`convscope.distributed.device`); ``workers``: processes that decode the images of an ImageFolder.
    Neither changes the run: they are not part of its config.

    A new run's data (its classes included) is loaded and checked before its directory is made; when this command
    fails before the first epoch is committed, what it created there is removed.

    ``renorm_twin``: for a run without renormalisation, the directory of the same run with it (Fig. 6a's pair).
    Until renormalisation first rescales a filter there, the two runs are the same bit for bit, so this one
    starts from the twin's state at that point (:func:`_fork`) instead of training those epochs again; the
    result is the one training from the start gives.
    """
    layout = Layout(run_dir)
    cfg.validate()
    cfg.data_spec().check()
    check_int(workers, "workers", 0, 1024)
    device = distributed.device(device)  # a device this machine lacks fails before anything is written
    group = distributed.init(device)
    if group.main:
        check_run_dir(layout, cfg)  # a foreign directory is refused before the lock leaves a trace in it
    if splits is None and not layout.config.is_file():  # a new run: its data and classes checked before it is made
        splits = load_data(cfg, workers)
    with (distributed.locked(layout.root, f"convscope train {cfg.model} on {cfg.data}", group),
          artifacts.undone_on_failure(layout.root, keep=layout.state.is_file, enabled=group.main)):
        if group.main:
            artifacts.clean(layout.root)  # what a write killed half-way left
            prepare_run(layout.root, cfg)
        distributed.barrier(group)  # the run directory exists before any rank reads it
        resuming = check_run_dir(layout, cfg)
        finished = _finished(layout) if resuming else None
        return finished or _train(cfg, layout, splits or load_data(cfg, workers), resuming, progress, group,
                                  device, workers, renorm_twin)


def _finished(layout: Layout) -> TrainResult | None:
    """A finished run (its final weights and test result there), loaded rather than trained again; a missing or
    damaged ``metrics.json`` is written again from the training state."""

    test = artifacts.read_json(layout.test)
    if not layout.final.is_file() or not result_ok(test):
        return None
    model, info = load_model(layout.final)
    metrics = artifacts.read_json(layout.metrics)
    if not metrics_ok(metrics) and layout.state.is_file():
        state = load_state(layout.state)
        if isinstance(state, dict) and metrics_ok(state.get("metrics")):
            metrics = state["metrics"]
            artifacts.write_json(layout.metrics, metrics)
    return TrainResult(layout.root, model, info["classes"], metrics if metrics_ok(metrics) else [], test)


METRICS = ("epoch", "lr", "train_loss", "train_top1_err", "val_loss", "val_top1_err", "val_top5_err", "seconds")


def _numbers(table, keys) -> bool:
    return isinstance(table, dict) and all(isinstance(table.get(k), int | float) and not isinstance(table.get(k), bool)
                                           and math.isfinite(table[k]) for k in keys)


def metrics_ok(value) -> bool:
    """Whether ``value`` is metrics as training writes them: a list of per-epoch tables of finite numbers."""
    return isinstance(value, list) and all(_numbers(m, METRICS) for m in value)


def result_ok(value) -> bool:
    """Whether ``value`` is a test result as training writes it (loss, top-1 and top-5 error)."""
    return _numbers(value, ("loss", "top1_err", "top5_err"))


def _train(cfg: TrainConfig, layout: Layout, splits: Splits, resuming: bool, progress: bool | None,
           group: distributed.Group | None = None, device: torch.device | None = None, workers: int = 0,
           renorm_twin: str | Path | None = None) -> TrainResult:
    """The epochs from where the run stands. Under torchrun (``group`` of several processes) the model is wrapped
    in DistributedDataParallel: every rank takes its share of each global batch (the batch size stays the
    config's), the gradients are averaged, the filters renormalised alike on every rank, the metrics summed
    across ranks, and rank 0 alone writes."""
    group = group or distributed.Group()
    classes = splits.train.classes
    device = device or distributed.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(cfg, splits, workers).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = configure_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                                           patience=cfg.patience)
    metrics: list[dict[str, float]] = []
    start = 0
    if resuming and layout.state.is_file():
        metrics, start = resume(layout.state, cfg, model, optimizer, scheduler)
    if start == 0 and renorm_twin is not None and not cfg.renorm:
        metrics, start = _fork(Layout(renorm_twin), cfg, layout, model, optimizer, scheduler, classes, group)
    initial = renormalize_filters_(model, cfg.renorm_radius) if cfg.renorm and start == 0 else 0
    trained = model
    if group.world > 1:  # the same start everywhere: DDP broadcasts rank 0's parameters
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss, err, rescaled = train_epoch(trained, splits.train, cfg, epoch, optimizer, progress, group, workers)
        val = evaluate(model, splits.val, workers=workers)  # the same weights on every rank: the same numbers
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(val["top1_err"])
        metrics.append({"epoch": epoch, "lr": lr, "train_loss": loss, "train_top1_err": err,
                        "val_loss": val["loss"], "val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"],
                        "seconds": time.perf_counter() - t0, "renormalised": rescaled + int(initial)})
        initial = 0
        if group.main:  # metrics and epoch weights first, the state last: the state is the commit point
            artifacts.write_json(layout.metrics, metrics)
            if epoch in cfg.save_epochs:
                save_weights(layout.checkpoint(epoch), model, cfg.to_dict(), epoch, len(classes), classes)
            if metrics[-1]["renormalised"] and epoch > 1 and _idle(metrics[:-1]) and layout.state.is_file():
                save_state(layout.idle_state, load_state(layout.state))  # the last epoch a twin without shares
            _commit(layout, cfg, model, optimizer, scheduler, metrics, epoch)
    test = artifacts.read_json(layout.test)
    if group.main and artifacts.read_json(layout.metrics) != json.loads(json.dumps(metrics)):  # missing or damaged
        artifacts.write_json(layout.metrics, metrics)
    if not result_ok(test) or not layout.final.is_file():
        # test result first, final weights last: the final weights say the run is finished, so a kill between the
        # two leaves a run that the same command finishes (it resumes from the state of the last epoch)
        test = evaluate(model, splits.test, workers=workers)
        if group.main:
            artifacts.write_json(layout.test, test)
            save_weights(layout.final, model, cfg.to_dict(), cfg.epochs, len(classes), classes)
    return TrainResult(layout.root, model.eval(), classes, metrics, test)


def _commit(layout: Layout, cfg: TrainConfig, model: nn.Module, optimizer, scheduler, metrics: list[dict],
            epoch: int) -> None:
    """Save the training state at the end of ``epoch`` (what :func:`resume` reads): the run's commit point."""
    save_state(layout.state, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "metrics": metrics, "epoch": epoch,
                              "config": cfg.to_dict()})


def _idle(metrics: list[dict]) -> bool:
    """Whether renormalisation rescaled no filter in any of these epochs (runs from before it was counted: no)."""
    return all(m.get("renormalised") == 0 for m in metrics)


def _fork(twin: Layout, cfg: TrainConfig, layout: Layout, model: nn.Module, optimizer, scheduler,
          classes: list[str], group: distributed.Group) -> tuple[list[dict], int]:
    """Start ``cfg`` (no renormalisation) from the epochs it shares with ``twin``, the same run with
    renormalisation: every epoch before the first in which the twin rescaled a filter, where the twin multiplied
    every filter by exactly 1. The twin's state at that point (``state.idle.pt``, or its last state if it never
    rescaled one) becomes this run's, with its metrics and epoch checkpoints written under this run's config.
    Returns (metrics, epoch); ([], 0) where nothing is shared (a twin of another config, or one whose
    renormalisation acted in its first epoch): the run then trains from the start."""
    from dataclasses import replace


    twin_cfg = replace(cfg, renorm=True)
    path = twin.idle_state if twin.idle_state.is_file() else twin.state
    if not path.is_file() or artifacts.read_json(twin.config) != json.loads(json.dumps(twin_cfg.to_dict())):
        return [], 0
    state = load_state(path)
    if not isinstance(state, dict) or not _idle(state.get("metrics") or [{}]):
        return [], 0
    if not all(twin.checkpoint(e).is_file() for e in cfg.save_epochs if e <= state.get("epoch", 0)):
        return [], 0
    metrics, epoch = resume(path, twin_cfg, model, optimizer, scheduler, state)
    if group.main:
        shared = {k: v.clone() for k, v in model.state_dict().items()}
        for e in (e for e in cfg.save_epochs if e <= epoch):
            tensors, _ = read_weights(twin.checkpoint(e))
            model.load_state_dict(tensors)
            save_weights(layout.checkpoint(e), model, cfg.to_dict(), e, len(classes), classes)
        model.load_state_dict(shared)
        artifacts.write_json(layout.metrics, metrics)
        _commit(layout, cfg, model, optimizer, scheduler, metrics, epoch)
    return metrics, epoch


def resume(path: Path, cfg: TrainConfig, model: nn.Module, optimizer, scheduler, state: Any = None
           ) -> tuple[list[dict], int]:
    """Load the training state saved at the end of an epoch (at ``path``, or ``state`` as read from it) into the
    model, optimiser and scheduler; return the metrics so far and the epoch. A state of another shape, or of
    another run, is refused with what to do."""
    state = load_state(path) if state is None else state
    fix = (f"delete {str(path)!r} to train this run again from the start (its epoch checkpoints stay), or choose "
           "another run directory")
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "metrics", "epoch"} <= set(state):
        raise ConvscopeError(f"{str(path)!r} is not a convscope training state ({type(state).__name__}); {fix}")
    epoch, metrics = state["epoch"], state["metrics"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= cfg.epochs:
        raise ConvscopeError(f"{str(path)!r} says epoch {shown(epoch)}, not one of this run's 0..{cfg.epochs}; {fix}")
    if not isinstance(metrics, list) or len(metrics) != epoch or not all(isinstance(m, dict) for m in metrics):
        raise ConvscopeError(f"{str(path)!r} holds {shown(metrics)} as metrics, not one entry per epoch; {fix}")
    if "config" in state and json.loads(json.dumps(state["config"])) != json.loads(json.dumps(cfg.to_dict())):
        raise ConvscopeError(f"{str(path)!r} is the state of another run (its config differs); {fix}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise ConvscopeError(f"{str(path)!r} does not fit this run's model or optimiser "
                             f"({type(e).__name__}: {str(e).splitlines()[0]}); {fix}") from None
    return list(metrics), epoch


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay (not on biases): the paper's optimiser (section 3)."""
    params = [{"params": [p for n, p in model.named_parameters() if not n.endswith("bias")]},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_epoch(model: nn.Module, data: ImageSet, cfg: TrainConfig, epoch: int, optimizer: torch.optim.Optimizer,
                progress: bool | None = None, group: distributed.Group | None = None, workers: int = 0
                ) -> tuple[float, float, int]:
    """One epoch of the paper's recipe; returns the running loss, top-1 error and the number of filters
    renormalisation rescaled (summed over the steps). Shuffling and augmentation come from a generator seeded
    by (seed, epoch), dropout from the global one seeded alike inside ``fork_rng`` (the caller's generator state
    is left as it was), so a resumed run repeats the epoch exactly.
    ``workers`` processes decode the batches (an ImageFolder read from disk), in the same order.

    Under torchrun (``group``; ``model`` wrapped in DistributedDataParallel) every rank draws the same order and
    the same augmentation of the whole global batch, then reads and trains on its own contiguous part of it;
    dropout is seeded per rank. The running loss and error are summed over the ranks."""
    group = group or distributed.Group()
    device = next(model.parameters()).device
    n = len(data)
    steps = math.ceil(n / cfg.batch_size)
    g = torch.Generator().manual_seed(_seeded(cfg.seed, epoch))
    order = torch.randperm(n, generator=g)
    globals_ = [order[step * cfg.batch_size:(step + 1) * cfg.batch_size] for step in range(steps)]
    shards = [group.shard(len(chunk)) for chunk in globals_]
    mine = [chunk[shard.start:shard.stop] for chunk, shard in zip(globals_, shards)]
    seen = wrong = 0
    loss_sum = 0.0
    rescaled: torch.Tensor | int = 0
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, unit="batch",
               disable=(None if progress is None else not progress) or not group.main)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_seeded(cfg.seed, epoch) + 1 + 7919 * group.rank)  # dropout
        model.train()
        for chunk, shard, (x, y) in zip(globals_, shards, batches(data, mine, workers)):
            batch = len(chunk)
            if cfg.crop_pad or cfg.flip:  # drawn for the global batch, so every rank advances g alike
                offsets, flips = draw_crop_flip(batch, cfg.crop_pad, g, cfg.flip)
                x = crop_flip(x, cfg.crop_pad, offsets[shard.start:shard.stop], flips[shard.start:shard.stop])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device):
                logits = model(x).float()
            if group.world == 1:
                loss = F.cross_entropy(logits, y)
                local_sum = loss.item() * len(y)
            else:  # DDP averages the ranks' gradients: each scaled so that they make the global batch's mean
                total = F.cross_entropy(logits, y, reduction="sum")
                loss, local_sum = total * (group.world / batch), total.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if cfg.renorm:
                rescaled = rescaled + renormalize_filters_(model, cfg.renorm_radius)
            seen += len(y)
            wrong += (logits.argmax(1) != y).sum().item()
            loss_sum += local_sum
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", err=f"{wrong / seen:.3f}")
    bar.close()
    if group.world > 1:
        totals = distributed.gather((loss_sum, wrong, seen), group)
        loss_sum, wrong, seen = (sum(t[i] for t in totals) for i in range(3))
    if not math.isfinite(loss_sum):
        raise ConvscopeError(f"training diverged at epoch {epoch} (loss is {loss_sum}); lower lr")
    return loss_sum / seen, wrong / seen, int(rescaled)


def run_summary(metrics: list[dict[str, Any]], test: dict[str, float]) -> str:
    last = metrics[-1] if metrics else {}
    return (f"{len(metrics)} epochs, {sum(m['seconds'] for m in metrics):.0f} s; "
            f"val top-1 error {last.get('val_top1_err', float('nan')):.3f}; "
            f"test top-1 accuracy {1 - test['top1_err']:.3f}, top-5 error {test['top5_err']:.3f}")
