"""The linear readout of frozen features that the per-layer probes (Table 7, :mod:`convscope.probes`) and
transfer (Tables 4-5, :mod:`convscope.transfer`) share: each layer's features of a target set, a linear
classifier fitted on them, and Caltech's measure.

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

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet
from .errors import ConvscopeError, check_int, unknown
from .forward import eval_mode, run_to_all
from .layers import PAPER_LAYERS, paper_names, site

POOLS = ("max", "avg")
CLASSIFIERS = ("svm", "softmax")
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
    names = [name for name in PAPER_LAYERS if name in paper_names(model)]
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


__all__ = ["CLASSIFIERS", "POOLS", "check_target", "default_layers", "extract_features", "fit_predict",
           "mean_per_class_accuracy", "sample_per_class"]
