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
  the target is to the pretraining classes: on digits, far from the synthetic scenes, the demo's fc7 is
  specialised to the pretraining classes and does worse than training from scratch, while all seven layers
  together do better (the README gives the numbers). Features are computed in eval mode (no dropout), once for all
  images; the new softmax is scikit-learn's multinomial ``LogisticRegression`` (L2, ``C=1``, lbfgs) on features
  standardised with the fold's training examples: a convex fit, so no learning rate or epochs to tune per fold
  and the same result for the same fold.
- **From scratch.** The same architecture (the pretrained :class:`~convscope.models.ConvNet`'s spec, or what
  ``scratch_model`` builds: a run's own architecture), freshly initialised (seeded), its input normalisation
  taken from the fold's training
  images, trained with the paper's recipe from ``scratch_cfg`` (SGD, momentum, weight decay, dropout, filter
  renormalisation, crop/flip augmentation) at a constant learning rate (a few-shot fold has no validation set to
  anneal on) for a fixed budget of ``scratch_steps`` SGD steps of ``min(batch_size, fold size)`` images,
  whatever n is: a small fold is seen many more times, as a net trained to convergence on it would be.
- **Spread.** The standard deviation over folds (with Bessel's correction; 0 for a single fold), as the paper's
  "+-".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .analyses import Analysis, register
from .config import TrainConfig
from .cpu import channels_last_pooling
from .data import ImageSet
from .data.loader import uint8_batches
from .data.transforms import mean_and_std, random_crop_flip
from .errors import ConvscopeError, check_int, check_seed
from .findings import finding, paired_contrast
from .forward import eval_mode
from .layers import PAPER_LAYERS, resolve_layer
from .layout import Layout
from .models import ConvNet
from .readout import check_target, default_layers, extract_features, fit_predict, mean_per_class_accuracy
from .tables import TextTable
from .targets import load_target
from .train import configure_optimizer, renormalize_filters_

if TYPE_CHECKING:
    from .run import Run

Factory = Callable[[int, int], nn.Module]  # (num_classes, seed) -> a fresh net

SHOTS = (1, 2, 5, 10, 15, 30)
FEATURES = ("fc7", "all")  # the paper's softmax on layer 7, and one on all seven frozen layers
# From the paper's Table 4 (Caltech-101, mean per-class accuracy %, 5 folds): n per class -> (pretrained,
# from scratch), as quoted in PAPER.md. Caltech-256 (Table 5) is left out rather than guessed.
PAPER_TABLE4 = {15: (83.8, 22.8), 30: (86.5, 46.5)}
PAPER_TABLE6 = 79.0  # PASCAL VOC 2012, mean accuracy over its 20 classes (%)


__all__ = ["FEATURES", "SHOTS", "TransferResult", "compute", "findings", "fold_indices", "mean_per_class_accuracy",
           "train_scratch", "transfer", "write_transfer"]


def fold_indices(labels: torch.Tensor, n: int, folds: int, seed: int = 0,
                 classes: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Sorted training indices of each fold: ``n`` per class, seeded, disjoint between folds where a class has
    ``n * folds`` examples or more (see the module doc for the rule)."""
    check_int(n, "examples per class", 1, 1_000_000)
    check_int(folds, "folds", 1, 1000)
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


def _scratch_model(pretrained: nn.Module, num_classes: int, factory: Factory | None, data: ImageSet,
                   seed: int) -> nn.Module:
    """A fresh net of the pretrained one's architecture (``factory(num_classes, seed)``, or the built-in
    ConvNet's spec), initialised under ``seed``, its input normalisation from ``data``."""

    if factory is not None:
        model = factory(num_classes, seed)
    elif isinstance(pretrained, ConvNet):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ConvNet(pretrained.spec, num_classes)
    else:
        raise ConvscopeError("the pretrained model is not a built-in ConvNet: pass scratch_model, a function "
                             "(num_classes, seed) -> a fresh net of its architecture, or scratch=False")
    if hasattr(model, "normalize"):
        mean, std = mean_and_std(uint8_batches(data))  # in memory, or decoded from a folder
        if mean.shape == model.normalize.mean.shape:
            model.normalize.mean.copy_(mean)
            model.normalize.std.copy_(std)
    return model.to(next(pretrained.parameters()).device)


# Few-shot training from scratch (a batch of 6 images, 300 steps at a constant learning rate) can catapult: on the
# demo's one-shot held-out fold the loss climbed from 0.3 to NaN in 30 steps. Gradients are clipped at this norm
# (timm's --clip-grad), well above an ordinary step's (median 4.3, 90th percentile 12 on those folds).
SCRATCH_CLIP = 20.0


def train_scratch(model: nn.Module, data: ImageSet, cfg: TrainConfig, steps: int, seed: int = 0) -> nn.Module:
    """The paper's recipe (section 3) on a few-shot training set, for ``steps`` SGD steps at constant learning
    rate, gradients clipped at :data:`SCRATCH_CLIP` (Tables 4-5's "non-pretrained" rows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # dropout, from the global generator; the caller's state is put back
        _steps(model, data, cfg, steps, g)
    return model.eval()


def _steps(model: nn.Module, data: ImageSet, cfg: TrainConfig, steps: int, g: torch.Generator) -> None:
    device = next(model.parameters()).device
    optimizer = configure_optimizer(model, cfg)
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
        x = random_crop_flip(x, cfg.crop_pad, g, cfg.flip) if (cfg.crop_pad or cfg.flip) else x
        with channels_last_pooling():  # the same numbers, faster on the CPU
            loss = F.cross_entropy(model(x.to(device)).float(), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), SCRATCH_CLIP)
        optimizer.step()
        if cfg.renorm:
            renormalize_filters_(model, cfg.renorm_radius)
        if not math.isfinite(loss.item()):
            raise ConvscopeError(f"training from scratch diverged (loss {loss.item()}); lower the lr of scratch_cfg")


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
    target: str = ""
    # feature set -> (len(shots), folds): the same softmax on the frozen features of the same net untrained (its
    # initialisation under ``seed``): what pretraining adds is the difference, not the accuracy alone
    untrained: dict[str, torch.Tensor] | None = None

    @staticmethod
    def spread(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation over folds (Bessel-corrected; 0 for one fold)."""
        std = acc.std(1, correction=1) if acc.shape[1] > 1 else torch.zeros(acc.shape[0], dtype=acc.dtype)
        return acc.mean(1), std

    def to_dict(self) -> dict:
        def summary(acc: torch.Tensor) -> dict:
            mean, std = self.spread(acc)
            return {"folds": acc.tolist(), "mean": mean.tolist(), "std": std.tolist()}

        return {"target": self.target, "shots": self.shots, "folds": self.folds, "classes": self.classes,
                "features": self.features,
                "n_test": self.n_test, "seed": self.seed, "scratch_steps": self.scratch_steps,
                "pretrained": {name: summary(acc) for name, acc in self.pretrained.items()},
                "scratch": None if self.scratch is None else summary(self.scratch),
                "untrained": None if self.untrained is None else {n: summary(a) for n, a in self.untrained.items()},
                "train_indices": {str(n): [f.tolist() for f in folds] for n, folds in self.train_indices.items()},
                "paper_caltech101": {str(n): {"pretrained": p, "scratch": s} for n, (p, s) in PAPER_TABLE4.items()}}


def findings(result: TransferResult, shots: int | None = None) -> list:
    """Paper section 5.1, Tables 4-5 and Fig. 9: features pretrained on a large set beat the same net trained from
    scratch on a few examples per class. Per frozen feature set, at ``shots`` per class (default the fewest
    measured): accuracy(frozen features + softmax) - accuracy(from scratch), paired over folds; and, the claim's
    cause, the same features of the same net untrained: accuracy(pretrained) - accuracy(untrained), since random
    conv features alone transfer well to a simple target (digits). Keys and the ``analysis`` label name the
    target (``transfer_<target>``), so two targets' findings live side by side."""

    if result.scratch is None or not result.shots:
        return []
    n = min(result.shots) if shots is None else shots
    if n not in result.shots:
        return []
    i, target = result.shots.index(n), result.target or "target"
    paper_n = min(PAPER_TABLE4, key=lambda k: abs(k - n))  # the paper's row nearest n (it has 15 and 30)
    paper = PAPER_TABLE4[paper_n]
    scratch = result.scratch[i]
    out = [finding(
        f"transfer.{target}.{name}.n{n}", f"on {target}, frozen pretrained features ({_label(result, name)}) beat "
        f"the same net trained from scratch at {n} per class", "Zeiler & Fergus 2014, Tables 4-5, Fig. 9",
        f"transfer_{target}", paired_contrast(acc[i], scratch, "folds"),
        f"accuracy(frozen {name} + softmax) - accuracy(from scratch), mean per-class",
        f"Caltech-101, {paper_n} per class: {paper[0]}% pretrained vs {paper[1]}% from scratch",
        f"{100 * float(acc[i].mean()):.1f}% vs {100 * float(scratch.mean()):.1f}% from scratch ({result.folds} "
        f"folds, chance {100 / len(result.classes):.1f}%)")
        for name, acc in result.pretrained.items()]
    for name, base in (result.untrained or {}).items():
        acc = result.pretrained[name]
        out.append(finding(
            f"transfer.{target}.{name}.n{n}.untrained", f"on {target}, pretraining is what makes the frozen features "
            f"({_label(result, name)}) transfer: they beat the same net's untrained features at {n} per class",
            "Zeiler & Fergus 2014, Tables 4-5 (the cause of their gap)", f"transfer_{target}",
            paired_contrast(acc[i], base[i], "folds"),
            f"accuracy(frozen {name}, pretrained) - accuracy(frozen {name}, untrained), mean per-class",
            "not measured in the paper", f"{100 * float(acc[i].mean()):.1f}% vs {100 * float(base[i].mean()):.1f}% "
            f"untrained ({result.folds} folds)"))
    return out


def transfer(pretrained_model: nn.Module, target_train: ImageSet, target_test: ImageSet,
             shots: Sequence[int] = SHOTS, folds: int = 5, seed: int = 0, features: Sequence[str] = FEATURES,
             C: float = 1.0, scratch: bool = True, scratch_cfg: TrainConfig | None = None, scratch_steps: int = 300,
             batch_size: int = 256, progress: bool | None = None, scratch_model: Factory | None = None,
             joined: Sequence[str] | None = None, target: str = "") -> TransferResult:
    """Paper Tables 4-5, Fig. 9: for every n in ``shots`` and every fold, a softmax on each of the frozen
    ``features`` of ``pretrained_model`` (a layer name, or ``"all"``: the layers ``joined``, default conv1..fc7)
    and (``scratch``) the same net trained from scratch (``scratch_model(num_classes, seed)`` builds it; the
    recipe is ``scratch_cfg``'s), all on the fold's n examples per class of ``target_train``, scored by mean
    per-class accuracy on all of ``target_test``."""
    check_target(target_train, target_test)
    if target_test is target_train:
        raise ConvscopeError("target_test is the training pool itself; pass a separate test set")
    sets = _feature_sets(pretrained_model, features, joined)  # a bad name fails before any work
    shots = [int(n) for n in shots]
    if not shots:
        raise ConvscopeError("no shots (examples per class) given")
    check_int(scratch_steps, "scratch_steps", 1, 10_000_000)
    indices = {n: fold_indices(target_train.labels, n, folds, seed, target_train.classes) for n in shots}
    k = len(target_train.classes)
    cfg = scratch_cfg or TrainConfig()
    layers = list(dict.fromkeys(layer for joined in sets.values() for layer in joined))
    train_f = extract_features(pretrained_model, target_train, layers, batch_size=batch_size)
    test_f = extract_features(pretrained_model, target_test, layers, batch_size=batch_size)
    joined = {name: (torch.cat([train_f[la] for la in ls], 1), torch.cat([test_f[la] for la in ls], 1))
              for name, ls in sets.items()}
    baseline = {}
    if scratch:  # the same layers of the same net at its initialisation (the scratch nets' architecture)
        model = _scratch_model(pretrained_model, k, scratch_model, target_train, seed)
        train_u = extract_features(model, target_train, layers, batch_size=batch_size)
        test_u = extract_features(model, target_test, layers, batch_size=batch_size)
        baseline = {name: (torch.cat([train_u[la] for la in ls], 1), torch.cat([test_u[la] for la in ls], 1))
                    for name, ls in sets.items()}
    untrained = {name: torch.zeros(len(shots), folds, dtype=torch.float64) for name in baseline} or None
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
            for name, (train_x, test_x) in baseline.items():
                untrained[name][i, f] = mean_per_class_accuracy(
                    fit_predict("softmax", train_x[idx], y, test_x, seed, C), target_test.labels, k)
            if scr is not None:
                fold = target_train.subset(idx)
                run_seed = seed * 1_000_003 + n * 101 + f
                model = _scratch_model(pretrained_model, k, scratch_model, fold, run_seed)
                train_scratch(model, fold, cfg, scratch_steps, run_seed)
                scr[i, f] = mean_per_class_accuracy(_predict(model, target_test), target_test.labels, k)
            bar.update()
    bar.close()
    return TransferResult(shots, folds, list(target_train.classes), sets, pre, scr, indices, len(target_test),
                          seed, scratch_steps if scratch else 0, target, untrained)


def _feature_sets(model: nn.Module, features: Sequence[str] | str,
                  joined: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Feature set name -> the layers it joins: ``"all"`` is ``joined`` (default every paper layer of the model,
    conv1..fc7)."""
    if isinstance(features, str):
        features = [features]
    if not features:
        raise ConvscopeError('no frozen features given; name a layer (e.g. fc7) or "all"')
    sets = {}
    for name in features:
        if name == "all":
            sets[name] = list(joined) if joined is not None else default_layers(model)
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
    columns.update({f"untrained net, softmax on {_label(result, name)}": acc
                    for name, acc in (result.untrained or {}).items()})
    if result.scratch is not None:
        columns["from scratch"] = result.scratch
    spreads = [result.spread(acc) for acc in columns.values()]
    rows = []
    for i, n in enumerate(result.shots):
        paper = PAPER_TABLE4.get(n)
        rows.append((str(n), *(f"{100 * m[i]:.1f} +- {100 * s[i]:.1f}" for m, s in spreads),
                     *((str(paper[0]), str(paper[1])) if paper is not None else ("-", "-"))))
    return TextTable(("n per class", *columns, "paper Caltech-101 pretrained", "paper scratch"), tuple(rows),
                     f"{len(result.classes)} classes, {result.folds} folds, {result.n_test} test images, mean "
                     "per-class accuracy (%) +- std over folds; new softmax on frozen features (conv layers "
                     f"max-pooled to 2x2); from scratch: {result.scratch_steps} SGD steps. Paper: Table 4 (softmax "
                     "on frozen layer 7).").markdown()


def _label(result: TransferResult, name: str) -> str:
    layers = result.features[name]
    return name if len(layers) == 1 else f"{layers[0]}..{layers[-1]} joined"


def transfer_figure(result: TransferResult, title: str = ""):
    """Fig. 9: mean per-class accuracy against training images per class, pretrained vs from scratch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
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
    ax.set_title(title or f"Fig. 9: transfer to {result.target or len(result.classes)} "
                          f"({len(result.classes)} classes)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def write_transfer(result: TransferResult, layout: Layout) -> list[Path]:
    """``transfer/<target>/transfer.json``, ``transfer.md`` (Tables 4-5) and ``transfer.png`` (Fig. 9)."""
    target = result.target or "target"
    return [artifacts.write_json(layout.transfer(target, ".json"), result.to_dict()),
            artifacts.write_text(layout.transfer(target, ".md"), transfer_table(result)),
            artifacts.save_figure(layout.transfer(target, ".png"), transfer_figure(result))]


def compute(run: Run, target: str = "heldout", data_root: str | None = None, shots: tuple[int, ...] = SHOTS,
            folds: int = 5, features: list[str] | None = None, scratch: bool = True, scratch_steps: int = 300,
            seed: int = 0, progress: bool | None = None) -> TransferResult:
    """Tables 4-5, Fig. 9 over a run: its model's layers frozen, a new softmax on ``features`` (fc7 and all; on a
    model without the paper's names its penultimate module and all) of n images per class of ``target``
    (:func:`convscope.targets.load_target`), against the same architecture trained from scratch with the run's
    recipe (the paper's for an attached run)."""

    check_seed(seed)
    train, test = load_target(target, run=run, data_root=data_root, seed=seed)
    if features is None:
        paper = "fc7" in run.paper_names
        features = ["fc7" if paper else run.vector_layer(), "all"]
    joined = None if set(PAPER_LAYERS) <= set(run.paper_names) else run.feature_layers()
    return transfer(run.model, train, test, shots, folds, seed, features, scratch=scratch,
                    scratch_cfg=run.config, scratch_steps=scratch_steps, progress=progress,
                    scratch_model=lambda k, s: run.new_model(k, s), joined=joined, target=target)


register(Analysis(
    "transfer", "transfer", "Tables 4-5, Fig. 9", "Transfer to small data sets",
    "Layers 1-7 kept fixed and a new softmax trained on n examples per class, on fc7 as in the paper and "
    "on conv1..fc7 joined, against the same net trained from scratch on those examples (mean per-class "
    "accuracy over folds).",
    files=lambda layout: (layout.transfers(".png"), layout.transfers(".md")), compute=compute,
    write=write_transfer, findings=findings,
    help={"target": "heldout (synthetic classes the run did not see), digits, folder (with --data-root), "
                    "run (the run's own splits).",
          "data_root": "ImageFolder tree for --target folder (Caltech-101/256).",
          "shots": "Training images per class.", "folds": "Seeded folds per number of shots.",
          "features": "Frozen feature sets, comma-separated, each scored: a layer (fc7: the paper's) or all "
                      "(every probed layer joined). [fc7,all; on other models the penultimate module and all]",
          "scratch": "Also train the same net from scratch.",
          "scratch_steps": "SGD steps of each from-scratch net.", "seed": "Seed of the folds and nets."},
    summary=transfer_table,
    paper=[("Caltech-101, 15 / 30 per class, pretrained (accuracy)", f"{PAPER_TABLE4[15][0]} / {PAPER_TABLE4[30][0]}"),
           ("Caltech-101, 15 / 30 per class, from scratch", f"{PAPER_TABLE4[15][1]} / {PAPER_TABLE4[30][1]}"),
           ("PASCAL 2012 (Table 6), mean accuracy", str(PAPER_TABLE6))]))
