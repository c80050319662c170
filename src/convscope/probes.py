"""How discriminative each layer's features are (paper section 5.2, Table 7): a linear SVM and a softmax trained
on the features of one layer at a time, on n examples per class of a target set; accuracy rises with depth.

Choices where the paper is silent:

- **Pooling.** A conv layer's maps are max-pooled (``pool="max"``, adaptive) to a ``grid`` x ``grid`` grid
  (default 2x2) and flattened, so every layer has a dimension of the same order (zfnet_small: conv1 128 ...
  conv3 384, fc6/fc7 256) and the comparison is about the features, not about how many raw values a linear
  classifier gets to fit (conv1's full maps have 32k values, fc7 has 256). Max rather than average because it
  asks "is this feature present in this quadrant", the question the network's own pooling asks; average
  pooling of layer 1 is mostly colour statistics. Fully connected layers are used as they are.
- **Standardisation.** Features are standardised with the training examples' mean and std (per dimension), so
  one regularisation strength (``C=1``) suits every layer.
- **Classifiers.** scikit-learn's ``LinearSVC`` (one-vs-rest, squared hinge) and ``LogisticRegression``
  (multinomial softmax, L2), both with ``C=1``.
- **Measure.** Mean per-class accuracy on the whole target test set (Caltech's measure, Tables 4-5, 7).
- **Features are the rectified outputs** of each layer (the paper's names, PAPER.md section 1), computed in
  eval mode (no dropout), all layers captured in one forward pass per batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import artifacts
from .analyses import LAYERS_HELP, Analysis, existing, register
from .data import ImageSet
from .errors import ConvscopeError, check_int, check_seed, unknown
from .forward import eval_mode, run_to_all
from .layers import PAPER_LAYERS, site
from .layout import Layout

if TYPE_CHECKING:
    from .run import Run

POOLS = ("max", "avg")
CLASSIFIERS = ("svm", "softmax")
# From the paper's Table 7 (Caltech-101, 30 training images per class, ImageNet-trained ZF net, mean per-class
# accuracy %), as far as PAPER.md quotes it: layer 1 and layer 5 of the SVM row. The other cells are left out
# rather than guessed; fill them in from the paper to show them beside ours.
PAPER_TABLE7: dict[str, dict[str, float]] = {"svm": {"conv1": 44.8, "conv5": 86.2}, "softmax": {}}


def mean_per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Accuracy of every class on its own, then averaged over the classes present in ``target`` (Caltech's
    measure, paper Tables 4-5 and 7): a large class counts as much as a small one."""
    pred, target = torch.as_tensor(pred).flatten(), torch.as_tensor(target).flatten()
    if pred.shape != target.shape:
        raise ConvscopeError(f"pred and target differ in length: {len(pred)} vs {len(target)}")
    if len(target) == 0:
        raise ConvscopeError("no examples to score")
    target = target.long()
    hits = torch.bincount(target[pred.long() == target], minlength=num_classes).double()
    counts = torch.bincount(target, minlength=num_classes).double()
    present = counts > 0
    return float((hits[present] / counts[present]).mean())


def check_target(train: ImageSet, test: ImageSet | None = None) -> None:
    """A target set must have at least two classes and the test set the same class list."""
    if len(train.classes) < 2 or len(torch.unique(train.labels)) < 2:
        raise ConvscopeError(f"the target set has {len(torch.unique(train.labels))} class(es) with examples; "
                             "a classifier needs at least two")
    if test is not None:
        if list(test.classes) != list(train.classes):
            raise ConvscopeError("the target train and test sets have different class lists: "
                                 f"{train.classes} vs {test.classes}")
        if len(test) == 0:
            raise ConvscopeError("the target test set is empty")


def sample_per_class(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` seeded random examples of every class present; a class with fewer is an error."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < n:
            raise ConvscopeError(f"class {c} has {len(idx)} training examples, fewer than the {n} per class asked")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.sort(torch.cat(chosen)).values


def default_layers(model: nn.Module) -> list[str]:
    names = [name for name in PAPER_LAYERS if name in getattr(model, "paper_layers", {})]
    if not names:
        raise ConvscopeError("this model has no paper layer names (conv1..fc7): pass the layers to probe")
    return names


def extract_features(model: nn.Module, data: ImageSet, layers: Sequence[str], pool: str = "max", grid: int = 2,
                     batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Layer -> (N, D) float features of every image of ``data``: one forward per batch captures all layers
    (and stops after the deepest); conv maps are pooled to ``grid`` x ``grid`` (see the module doc)."""
    if pool not in POOLS:
        raise unknown("pool", pool, POOLS)
    check_int(grid, "grid", 1, 64)  # 64 x 64 cells per map is already more values than any layer has
    modules = [site(model, layer) for layer in layers]
    size = getattr(model, "input_size", None)
    if size is not None and len(data) and data.image_size != size:
        raise ConvscopeError(f"the model takes {size} px images but the data set {data.name!r} has "
                             f"{data.image_size} px; load it at size={size}")
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.inference_mode(), eval_mode(model):
        for start in range(0, len(data), batch_size):
            x, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            for layer, out in zip(layers, run_to_all(model, modules, x.to(device))):
                if out.ndim == 4:
                    out = (F.adaptive_max_pool2d if pool == "max" else F.adaptive_avg_pool2d)(out, grid)
                parts[layer].append(out.flatten(1).float().cpu())
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def fit_predict(kind: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, seed: int = 0,
                C: float = 1.0) -> torch.Tensor:
    """Standardise on the training features, fit a linear SVM (``"svm"``) or a softmax (``"softmax"``), and
    predict the test features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if kind not in CLASSIFIERS:
        raise unknown("classifier", kind, CLASSIFIERS)
    scaler = StandardScaler().fit(train_x.double().numpy())
    clf = (LinearSVC(C=C, max_iter=5000, random_state=seed % 2**32) if kind == "svm"  # scikit-learn's seeds: 32 bits
           else LogisticRegression(C=C, max_iter=2000))
    with warnings.catch_warnings():
        # a fit on a few hundred standardised examples may stop just short of the solver's tolerance; the
        # predictions do not change, and a warning per layer and fold would bury the table
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x.double().numpy()), train_y.numpy())
    return torch.from_numpy(clf.predict(scaler.transform(test_x.double().numpy()))).long()


@dataclass
class ProbeResult:
    """Paper Table 7: mean per-class accuracy (0..1) of each classifier on each layer's features."""

    layers: list[str]
    dims: dict[str, int]
    accuracy: dict[str, dict[str, float]]  # classifier -> layer -> mean per-class accuracy
    classes: list[str]
    n_per_class: int | None  # None: every training example
    n_train: int
    n_test: int
    pool: str
    grid: int
    seed: int
    paper: dict[str, dict[str, float]] = field(default_factory=lambda: PAPER_TABLE7)
    # per test example, whether each classifier on each layer got it right, and its label: the units that the
    # findings pair across layers
    correct: dict[str, dict[str, list[bool]]] = field(default_factory=dict)
    test_labels: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def probe_layers(model: nn.Module, train: ImageSet, test: ImageSet, layers: Sequence[str] | None = None,
                 n_per_class: int | None = None, seed: int = 0, pool: str = "max", grid: int = 2,
                 classifiers: Sequence[str] = CLASSIFIERS, C: float = 1.0, batch_size: int = 256) -> ProbeResult:
    """Paper Table 7: a linear SVM and a softmax on each layer's (pooled, standardised) features, trained on
    ``n_per_class`` seeded examples per class of ``train`` (None: all of them), scored on all of ``test``."""
    check_target(train, test)
    layers = list(layers) if layers is not None else default_layers(model)
    if not layers:
        raise ConvscopeError("no layers to probe")
    for kind in classifiers:
        if kind not in CLASSIFIERS:
            raise unknown("classifier", kind, CLASSIFIERS)
    if n_per_class is not None:
        check_int(n_per_class, "n_per_class", 1, 10**9)
        train = train.subset(sample_per_class(train.labels, n_per_class, seed))
    train_f = extract_features(model, train, layers, pool, grid, batch_size)
    test_f = extract_features(model, test, layers, pool, grid, batch_size)
    k = len(train.classes)
    pred = {kind: {layer: fit_predict(kind, train_f[layer], train.labels, test_f[layer], seed, C) for layer in layers}
            for kind in classifiers}
    accuracy = {kind: {layer: mean_per_class_accuracy(p, test.labels, k) for layer, p in ps.items()}
                for kind, ps in pred.items()}
    correct = {kind: {layer: (p == test.labels).tolist() for layer, p in ps.items()} for kind, ps in pred.items()}
    return ProbeResult(layers, {layer: int(train_f[layer].shape[1]) for layer in layers}, accuracy,
                       list(train.classes), n_per_class, len(train), len(test), pool, grid, seed,
                       correct=correct, test_labels=test.labels.tolist())


def findings(result: ProbeResult, classifier: str = "svm") -> list:
    """Paper section 5.2, Table 7: deeper features are more discriminative. Contrast: the accuracy of
    ``classifier`` (the paper's linear SVM) on the deepest probed layer minus on the first, paired over test
    examples; each example's 0/1 correctness is weighted by N / (classes x its class's examples), so the mean is
    the table's mean per-class accuracy."""
    from .findings import finding, paired_contrast

    right = result.correct.get(classifier, {})
    first, last = result.layers[0], result.layers[-1]
    if first == last or first not in right or last not in right:
        return []  # one layer, or a result made without per-example correctness: nothing to pair
    labels = torch.tensor(result.test_labels, dtype=torch.long)
    counts = torch.bincount(labels).double()
    weight = len(labels) / (int((counts > 0).sum()) * counts[labels])  # 1 for every example when classes are even
    contrast = paired_contrast(torch.tensor(right[last]).double() * weight,
                               torch.tensor(right[first]).double() * weight, "test examples")
    paper = result.paper.get(classifier, {})
    acc = result.accuracy[classifier]
    return [finding(
        f"table7.{classifier}.{first}_vs_{last}", f"deeper features are more discriminative: {classifier} accuracy "
        f"rises from {first} to {last}", "Zeiler & Fergus 2014, Table 7", "table7", contrast,
        f"accuracy({last}) - accuracy({first}), {classifier}, mean per-class",
        "Caltech-101, 30 per class: " + ", ".join(f"{la} {v:.1f}%" for la, v in paper.items()) if paper else "-",
        f"{first} {100 * acc[first]:.1f}%, {last} {100 * acc[last]:.1f}% ({len(labels)} test examples)")]


def probe_table(result: ProbeResult) -> str:
    """Table 7 as text: one row per layer, ours beside the paper's (Caltech-101, 30 per class)."""
    kinds = list(result.accuracy)
    head = "| layer | dim | " + " | ".join(f"{k} (ours) | {k} (paper)" for k in kinds) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(kinds))]
    for layer in result.layers:
        cells = []
        for kind in kinds:
            paper = result.paper.get(kind, {}).get(layer)
            cells += [f"{100 * result.accuracy[kind][layer]:.1f}", "-" if paper is None else f"{paper:.1f}"]
        rows.append(f"| {layer} | {result.dims[layer]} | " + " | ".join(cells) + " |")
    n = "all" if result.n_per_class is None else result.n_per_class
    rows.append(f"\nmean per-class accuracy (%), {n} training examples per class ({result.n_train} in all), "
                f"{result.n_test} test examples; conv maps {result.pool}-pooled to {result.grid}x{result.grid}. "
                "Paper: Table 7, Caltech-101, 30 per class.")
    return "\n".join(rows) + "\n"


def probe_figure(result: ProbeResult):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    x = range(len(result.layers))
    for kind, acc in result.accuracy.items():
        ax.plot(x, [100 * acc[layer] for layer in result.layers], marker="o", label=f"{kind} (ours)")
        paper = result.paper.get(kind, {})
        ax.plot([i for i, layer in enumerate(result.layers) if layer in paper],
                [paper[layer] for layer in result.layers if layer in paper], ls="--", marker="x",
                label=f"{kind} (paper, Caltech-101)")
    ax.set_xticks(list(x), result.layers)
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_title("Table 7: linear classifiers on each layer's features")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def write_probes(result: ProbeResult, layout: Layout) -> list[Path]:
    """``probes/probes.json``, ``probes.md`` (the table) and ``probes.png`` (accuracy against depth)."""
    return [artifacts.write_json(layout.probe(".json"), result.to_dict()),
            artifacts.write_text(layout.probe(".md"), probe_table(result)),
            artifacts.save_figure(layout.probe(".png"), probe_figure(result))]


def compute(run: Run, layers: list[str] | None = None, target: str = "run", data_root: str | None = None,
            n_per_class: int = 30, pool: str = "max", grid: int = 2, seed: int = 0) -> ProbeResult:
    """Table 7 over a run: probe its model's layers (conv1..fc7, or the stages and the penultimate module) on a
    target (:func:`convscope.targets.load_target`; ``"run"``: the run's own train and test splits)."""
    from .targets import load_target

    check_seed(seed)
    layers = run.check_layers(list(layers)) if layers is not None else run.feature_layers()
    train, test = load_target(target, run=run, data_root=data_root, seed=seed)
    return probe_layers(run.model, train, test, layers, n_per_class=n_per_class, seed=seed, pool=pool, grid=grid)


register(Analysis(
    "probe-layers", "table7", "Table 7", "Discriminative power of each layer",
    "A linear SVM and a softmax on the features of one layer at a time: accuracy rises with depth.",
    files=lambda layout: (existing(layout.probe(".png")), existing(layout.probe(".md"))),
    compute=compute, write=write_probes, findings=findings,
    help={"layers": LAYERS_HELP + " [conv1..fc7, or the model's stages and penultimate module]",
          "target": "Target set: run (its own splits), heldout, digits, folder (with --data-root).",
          "data_root": "ImageFolder tree for --target folder.", "n_per_class": "Training examples per class.",
          "pool": "Pooling of conv maps to a fixed grid: max or avg.", "grid": "Side of that grid.",
          "seed": "Seed of the examples drawn."},
    summary=probe_table,
    paper=[(f"Caltech-101 linear SVM, layer {layer[-1]} (accuracy)", str(acc))
           for layer, acc in PAPER_TABLE7["svm"].items()]))
