"""How discriminative each layer's features are (paper section 5.2, Table 7): a linear SVM and a softmax trained
on the features of one layer at a time, on n examples per class of a target set; accuracy rises with depth.
The features, the classifiers and the measure are :mod:`convscope.readout`'s (its doc gives the choices made
where the paper is silent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import artifacts
from .analyses import LAYERS_HELP, Analysis, existing, register
from .data import ImageSet
from .errors import ConvscopeError, check_int, check_seed, unknown
from .findings import finding, paired_contrast
from .layout import Layout
from .readout import (
    CLASSIFIERS,
    check_target,
    default_layers,
    extract_features,
    fit_predict,
    mean_per_class_accuracy,
    sample_per_class,
)
from .tables import TextTable
from .targets import load_target

if TYPE_CHECKING:
    from .run import Run

# From the paper's Table 7 (Caltech-101, 30 training images per class, ImageNet-trained ZF net, mean per-class
# accuracy %), as far as PAPER.md quotes it: layer 1 and layer 5 of the SVM row. The other cells are left out
# rather than guessed; fill them in from the paper to show them beside ours.
PAPER_TABLE7: dict[str, dict[str, float]] = {"svm": {"conv1": 44.8, "conv5": 86.2}, "softmax": {}}


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
    rows = []
    for layer in result.layers:
        cells = []
        for kind in kinds:
            paper = result.paper.get(kind, {}).get(layer)
            cells += [f"{100 * result.accuracy[kind][layer]:.1f}", "-" if paper is None else f"{paper:.1f}"]
        rows.append((layer, str(result.dims[layer]), *cells))
    n = "all" if result.n_per_class is None else result.n_per_class
    return TextTable(("layer", "dim", *(c for k in kinds for c in (f"{k} (ours)", f"{k} (paper)"))), tuple(rows),
                     f"mean per-class accuracy (%), {n} training examples per class ({result.n_train} in all), "
                     f"{result.n_test} test examples; conv maps {result.pool}-pooled to {result.grid}x{result.grid}. "
                     "Paper: Table 7, Caltech-101, 30 per class.").markdown()


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
