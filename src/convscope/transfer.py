"""Transfer of features to small data sets (paper section 5.1, Tables 4-5, Fig. 9): layers 1-7 of a pretrained
net kept fixed and a new softmax trained on n examples per class of a target set, against the same architecture
trained from scratch on the same examples; for every n, ``folds`` seeded folds, mean per-class accuracy.

Choices where the paper is silent:

- **Folds.** Every class's training pool is shuffled once (seeded by ``seed``, the same order for every n, so
  the n = 5 set of fold f lies inside its n = 10 set and the curve of Fig. 9 is not noisier than the data).
  Fold f takes the n consecutive examples starting at position f * n, wrapping around the pool. Folds are
  therefore disjoint for every class with at least ``n * folds`` examples; a class with fewer shares as few
  examples between folds as it can (each example in at most ceil(n * folds / pool) folds). A class with fewer
  than n examples is an error. Test examples come from a separate set and are never trained on.
- **Frozen features.** Each entry of ``features`` is one set of frozen features, scored side by side: a layer
  name (its rectified output; a conv layer max-pooled to 2x2 as the probes of Table 7 do), or ``"all"``, every
  paper layer conv1..fc7 so pooled and joined. The default is both ``fc7``, the paper's (a softmax on top of
  layer 7), and ``all``, a softmax that reads all seven frozen layers: how far fc7 carries depends on how close
  the target is to the pretraining classes. Measured here at 5 per class (3 folds): on synthetic classes held
  out of pretraining, fc7 41 % and all 43 % against 18 % from scratch; on digits, far from the synthetic
  scenes, fc7 is specialised to the pretraining classes (53 %, below 77 % from scratch) while conv2 and conv3
  alone carry (78 %, 79 %) and all gets 80 %. Features are computed in eval mode (no dropout), once for all
  images; the new softmax is scikit-learn's multinomial ``LogisticRegression`` (L2, ``C=1``, lbfgs) on features
  standardised with the fold's training examples: a convex fit, so no learning rate or epochs to tune per fold
  and the same result for the same fold.
- **From scratch.** The same architecture (the pretrained :class:`~convscope.models.ConvNet`'s spec, or
  ``scratch_cfg.model``), freshly initialised (seeded), its input normalisation taken from the fold's training
  images, trained with the paper's recipe from ``scratch_cfg`` (SGD, momentum, weight decay, dropout, filter
  renormalisation, crop/flip augmentation) at a constant learning rate (a few-shot fold has no validation set to
  anneal on) for a fixed budget of ``scratch_steps`` SGD steps of ``min(batch_size, fold size)`` images,
  whatever n is: a small fold is seen many more times, as a net trained to convergence on it would be.
- **Spread.** The standard deviation over folds (with Bessel's correction; 0 for a single fold), as the paper's
  "+-".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .config import TrainConfig
from .data import ImageSet, stratified_split
from .data.transforms import mean_and_std, random_crop_flip
from .errors import ConvscopeError, unknown
from .forward import eval_mode
from .layers import resolve_layer
from .probes import check_target, default_layers, extract_features, fit_predict, mean_per_class_accuracy
from .train import renormalize_filters_

SHOTS = (1, 2, 5, 10, 15, 30)
FEATURES = ("fc7", "all")  # the paper's softmax on layer 7, and one on all seven frozen layers
TARGETS = ("heldout", "digits", "folder", "run")
# From the paper's Table 4 (Caltech-101, mean per-class accuracy %, 5 folds): n per class -> (pretrained,
# from scratch), as quoted in PAPER.md. Caltech-256 (Table 5) is left out rather than guessed.
PAPER_TABLE4 = {15: (83.8, 22.8), 30: (86.5, 46.5)}

__all__ = ["FEATURES", "SHOTS", "TransferResult", "fold_indices", "load_target", "mean_per_class_accuracy",
           "train_scratch", "transfer", "transfer_run", "write_transfer"]


def fold_indices(labels: torch.Tensor, n: int, folds: int, seed: int = 0,
                 classes: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Sorted training indices of each fold: ``n`` per class, seeded, disjoint between folds where a class has
    ``n * folds`` examples or more (see the module doc for the rule)."""
    if not isinstance(n, int) or n < 1:
        raise ConvscopeError(f"examples per class must be a positive integer, got {n!r}")
    if not isinstance(folds, int) or folds < 1:
        raise ConvscopeError(f"folds must be a positive integer, got {folds!r}")
    g = torch.Generator().manual_seed(seed)
    out: list[list[torch.Tensor]] = [[] for _ in range(folds)]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        if len(idx) < n:
            name = classes[c] if classes is not None and c < len(classes) else c
            raise ConvscopeError(f"class {name!r} has {len(idx)} training examples, fewer than the {n} per class "
                                 "asked; lower the shots or add examples")
        for f in range(folds):
            out[f].append(idx[(f * n + torch.arange(n)) % len(idx)])
    return [torch.sort(torch.cat(parts)).values for parts in out]


def _scratch_model(pretrained: nn.Module, num_classes: int, cfg: TrainConfig | None, data: ImageSet,
                   seed: int) -> nn.Module:
    from .models import ConvNet, create_model

    torch.manual_seed(seed)
    if isinstance(pretrained, ConvNet):
        model = ConvNet(pretrained.spec, num_classes)
    elif cfg is not None:
        model = create_model(cfg.model, num_classes=num_classes, **cfg.model_options)
    else:
        raise ConvscopeError("the pretrained model is not a built-in ConvNet: pass scratch_cfg naming the "
                             "architecture to train from scratch, or scratch=False")
    if hasattr(model, "normalize"):
        mean, std = mean_and_std(data.images)
        if mean.shape == model.normalize.mean.shape:
            model.normalize.mean.copy_(mean)
            model.normalize.std.copy_(std)
    return model.to(next(pretrained.parameters()).device)


def train_scratch(model: nn.Module, data: ImageSet, cfg: TrainConfig, steps: int, seed: int = 0) -> nn.Module:
    """The paper's recipe (section 3) on a few-shot training set, for ``steps`` SGD steps at constant learning
    rate (Tables 4-5's "non-pretrained" rows)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)  # dropout
    params = [{"params": [p for n, p in model.named_parameters() if not n.endswith("bias")]},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.renorm:
        renormalize_filters_(model, cfg.renorm_radius)
    n = len(data)
    batch = min(cfg.batch_size, n)
    order, pos = torch.randperm(n, generator=g), 0
    model.train()
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        x, y = data.batch(order[pos:pos + batch])
        pos += batch
        x = random_crop_flip(x, cfg.crop_pad, g) if (cfg.crop_pad or cfg.flip) else x
        loss = F.cross_entropy(model(x.to(device)).float(), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.renorm:
            renormalize_filters_(model, cfg.renorm_radius)
        if not math.isfinite(loss.item()):
            raise ConvscopeError(f"training from scratch diverged (loss {loss.item()}); lower the lr of scratch_cfg")
    return model.eval()


def _predict(model: nn.Module, data: ImageSet, batch_size: int = 500) -> torch.Tensor:
    device = next(model.parameters()).device
    preds = []
    with torch.inference_mode(), eval_mode(model):
        for start in range(0, len(data), batch_size):
            x, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            preds.append(model(x.to(device)).argmax(1).cpu())
    return torch.cat(preds)


@dataclass
class TransferResult:
    """Paper Tables 4-5 and Fig. 9: mean per-class accuracy (0..1) per n (rows) and fold (columns)."""

    shots: list[int]
    folds: int
    classes: list[str]
    features: dict[str, list[str]]  # feature set -> the frozen layers it joins
    pretrained: dict[str, torch.Tensor]  # feature set -> (len(shots), folds)
    scratch: torch.Tensor | None  # (len(shots), folds), None when not trained
    train_indices: dict[int, list[torch.Tensor]]  # n -> each fold's indices into the target training pool
    n_test: int
    seed: int
    scratch_steps: int

    @staticmethod
    def spread(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation over folds (Bessel-corrected; 0 for one fold)."""
        std = acc.std(1, correction=1) if acc.shape[1] > 1 else torch.zeros(acc.shape[0], dtype=acc.dtype)
        return acc.mean(1), std

    def to_dict(self) -> dict:
        def summary(acc: torch.Tensor) -> dict:
            mean, std = self.spread(acc)
            return {"folds": acc.tolist(), "mean": mean.tolist(), "std": std.tolist()}

        return {"shots": self.shots, "folds": self.folds, "classes": self.classes, "features": self.features,
                "n_test": self.n_test, "seed": self.seed, "scratch_steps": self.scratch_steps,
                "pretrained": {name: summary(acc) for name, acc in self.pretrained.items()},
                "scratch": None if self.scratch is None else summary(self.scratch),
                "train_indices": {str(n): [f.tolist() for f in folds] for n, folds in self.train_indices.items()},
                "paper_caltech101": {str(n): {"pretrained": p, "scratch": s} for n, (p, s) in PAPER_TABLE4.items()}}


def transfer(pretrained_model: nn.Module, target_train: ImageSet, target_test: ImageSet,
             shots: Sequence[int] = SHOTS, folds: int = 5, seed: int = 0, features: Sequence[str] = FEATURES,
             C: float = 1.0, scratch: bool = True, scratch_cfg: TrainConfig | None = None, scratch_steps: int = 300,
             batch_size: int = 256, progress: bool | None = None) -> TransferResult:
    """Paper Tables 4-5, Fig. 9: for every n in ``shots`` and every fold, a softmax on each of the frozen
    ``features`` of ``pretrained_model`` (a layer name, or ``"all"``: conv1..fc7 joined) and (``scratch``) the
    same net trained from scratch, all on the fold's n examples per class of ``target_train``, scored by mean
    per-class accuracy on all of ``target_test``."""
    check_target(target_train, target_test)
    if target_test is target_train:
        raise ConvscopeError("target_test is the training pool itself; pass a separate test set")
    sets = _feature_sets(pretrained_model, features)  # a bad name fails before any work
    shots = [int(n) for n in shots]
    if not shots:
        raise ConvscopeError("no shots (examples per class) given")
    if scratch_steps < 1:
        raise ConvscopeError(f"scratch_steps must be at least 1, got {scratch_steps}")
    indices = {n: fold_indices(target_train.labels, n, folds, seed, target_train.classes) for n in shots}
    k = len(target_train.classes)
    cfg = scratch_cfg or TrainConfig()
    layers = list(dict.fromkeys(layer for joined in sets.values() for layer in joined))
    train_f = extract_features(pretrained_model, target_train, layers, batch_size=batch_size)
    test_f = extract_features(pretrained_model, target_test, layers, batch_size=batch_size)
    joined = {name: (torch.cat([train_f[la] for la in ls], 1), torch.cat([test_f[la] for la in ls], 1))
              for name, ls in sets.items()}
    pre = {name: torch.zeros(len(shots), folds, dtype=torch.float64) for name in sets}
    scr = torch.zeros(len(shots), folds, dtype=torch.float64) if scratch else None
    bar = tqdm(total=len(shots) * folds, desc="transfer", disable=None if progress is None else not progress,
               unit="fold")
    for i, n in enumerate(shots):
        for f, idx in enumerate(indices[n]):
            y = target_train.labels[idx]
            for name, (train_x, test_x) in joined.items():
                pre[name][i, f] = mean_per_class_accuracy(fit_predict("softmax", train_x[idx], y, test_x, seed, C),
                                                          target_test.labels, k)
            if scr is not None:
                fold = target_train.subset(idx)
                run_seed = seed * 1_000_003 + n * 101 + f
                model = _scratch_model(pretrained_model, k, scratch_cfg, fold, run_seed)
                train_scratch(model, fold, cfg, scratch_steps, run_seed)
                scr[i, f] = mean_per_class_accuracy(_predict(model, target_test), target_test.labels, k)
            bar.update()
    bar.close()
    return TransferResult(shots, folds, list(target_train.classes), sets, pre, scr, indices, len(target_test),
                          seed, scratch_steps if scratch else 0)


def _feature_sets(model: nn.Module, features: Sequence[str] | str) -> dict[str, list[str]]:
    """Feature set name -> the layers it joins: ``"all"`` is every paper layer of the model (conv1..fc7)."""
    if isinstance(features, str):
        features = [features]
    if not features:
        raise ConvscopeError('no frozen features given; name a layer (e.g. fc7) or "all"')
    sets = {}
    for name in features:
        if name == "all":
            sets[name] = default_layers(model)
        else:
            try:
                resolve_layer(model, name)
            except ConvscopeError as e:
                raise ConvscopeError(f'{e}; or "all" for conv1..fc7 joined') from None
            sets[name] = [name]
    return sets


def transfer_table(result: TransferResult) -> str:
    """Tables 4-5 as text: mean per-class accuracy (%) +- std over folds, per n; the paper's Caltech-101 rows."""
    columns = {f"frozen, softmax on {_label(result, name)}": acc for name, acc in result.pretrained.items()}
    if result.scratch is not None:
        columns["from scratch"] = result.scratch
    spreads = [result.spread(acc) for acc in columns.values()]
    rows = ["| n per class | " + " | ".join(columns) + " | paper Caltech-101 pretrained | paper scratch |",
            "|---|" + "---|" * (len(columns) + 2)]
    for i, n in enumerate(result.shots):
        paper = PAPER_TABLE4.get(n)
        cells = " | ".join(f"{100 * m[i]:.1f} +- {100 * s[i]:.1f}" for m, s in spreads)
        rows.append(f"| {n} | {cells} | {'-' if paper is None else paper[0]} | {'-' if paper is None else paper[1]} |")
    rows.append(f"\n{len(result.classes)} classes, {result.folds} folds, {result.n_test} test images, mean per-class "
                f"accuracy (%) +- std over folds; new softmax on frozen features (conv layers max-pooled to 2x2); "
                f"from scratch: {result.scratch_steps} SGD steps. Paper: Table 4 (softmax on frozen layer 7).")
    return "\n".join(rows) + "\n"


def _label(result: TransferResult, name: str) -> str:
    layers = result.features[name]
    return name if len(layers) == 1 else f"{layers[0]}..{layers[-1]} joined"


def transfer_figure(result: TransferResult, title: str = ""):
    """Fig. 9: mean per-class accuracy against training images per class, pretrained vs from scratch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    curves = [(f"pretrained, frozen: softmax on {_label(result, name)}", acc, "o^Dv"[i % 4])
              for i, (name, acc) in enumerate(result.pretrained.items())]
    for name, acc, marker in [*curves, ("from scratch", result.scratch, "s")]:
        if acc is None:
            continue
        mean, std = result.spread(acc)
        ax.errorbar(result.shots, 100 * mean, yerr=100 * std, marker=marker, capsize=3, label=name)
    ax.axhline(100 / len(result.classes), color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"Fig. 9: transfer to {len(result.classes)} classes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def write_transfer(result: TransferResult, directory: str | os.PathLike, title: str = "") -> list[Path]:
    """``transfer.json``, ``transfer.md`` (Tables 4-5) and ``transfer.png`` (Fig. 9) in ``directory``."""
    directory = Path(directory)
    return [artifacts.write_json(directory / "transfer.json", result.to_dict()),
            artifacts.write_text(directory / "transfer.md", transfer_table(result)),
            artifacts.save_figure(directory / "transfer.png", transfer_figure(result, title))]


def load_target(target: str, run=None, data_root: str | os.PathLike | None = None, seed: int = 0,
                size: int | None = None, n_train: int | None = None,
                n_test: int | None = None) -> tuple[ImageSet, ImageSet]:
    """A target set as (training pool, test set).

    ``heldout``: the synthetic classes the run was not trained on (needs a run pretrained on some classes);
    ``n_train`` / ``n_test`` images, default 150 / 100 per class (30 per class x 5 disjoint folds).
    ``digits``: scikit-learn's digits at the model's input size, its own train/test split.
    ``folder``: an ImageFolder tree at ``data_root`` (Caltech-101/256), split per class 70/30, seeded.
    ``run``: the run's own train and test splits.
    """
    if target not in TARGETS:
        raise unknown("target", target, TARGETS)
    if size is None:
        size = getattr(getattr(run, "model", None), "input_size", None) or 64
    if target == "run":
        if run is None:
            raise ConvscopeError("target 'run' needs a run")
        return run.split("train"), run.split("test")
    if target == "heldout":
        from .data.synthetic import CLASSES, load_synthetic

        if run is None or run.config.data != "synthetic":
            raise ConvscopeError("target 'heldout' needs a run pretrained on the synthetic data set")
        seen = run.config.classes or CLASSES
        others = [c for c in CLASSES if c not in seen]
        if len(others) < 2:
            raise ConvscopeError(f"the run was trained on {len(seen)} of the {len(CLASSES)} synthetic classes, "
                                 "leaving fewer than two held out; pretrain with classes= a subset (e.g. six)")
        # images of classes the run never saw; its own seed, so the pool is reproducible from the run alone
        n_train = n_train if n_train is not None else 150 * len(others)
        n_test = n_test if n_test is not None else 100 * len(others)
        return (load_synthetic("train", n=n_train, size=size, seed=run.config.seed, classes=others),
                load_synthetic("test", n=n_test, size=size, seed=run.config.seed, classes=others))
    if target == "digits":
        from .data.digits import load_digits

        return load_digits("train", size=size, seed=seed), load_digits("test", size=size, seed=seed)
    from .data.folder import load_folder

    if data_root is None:
        raise ConvscopeError("target 'folder' needs data_root: the folder of the ImageFolder tree")
    full = load_folder(data_root, size=size)
    pool, test = stratified_split(full.labels, (0.7,), seed)
    return full.subset(pool), full.subset(test)


def transfer_run(run_path: str | os.PathLike, target: str = "heldout", data_root: str | None = None,
                 shots: Sequence[int] = SHOTS, folds: int = 5, seed: int = 0, features: Sequence[str] = FEATURES,
                 scratch: bool = True, scratch_steps: int = 300, out: str | os.PathLike | None = None,
                 progress: bool | None = None) -> tuple[TransferResult, list[Path]]:
    """CLI entry (``convscope transfer RUN``): transfer a run's model to ``target`` (see :func:`load_target`)
    and write Tables 4-5 and Fig. 9 into ``out`` (default ``RUN/transfer/<target>``); the from-scratch net
    uses the run's own training recipe."""
    from .runs import open_run

    run = open_run(run_path)
    train, test = load_target(target, run=run, data_root=data_root, seed=seed)
    result = transfer(run.model, train, test, shots, folds, seed, features, scratch=scratch, scratch_cfg=run.config,
                      scratch_steps=scratch_steps, progress=progress)
    out = Path(out) if out is not None else run.path / "transfer" / target
    return result, write_transfer(result, out, title=f"Fig. 9: {Path(run_path).name} -> {target}")
