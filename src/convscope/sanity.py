"""Sanity checks for the pictures (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018): does a
method's map change when the network's weights are randomised? A map that stays the same after the weights it
is meant to explain are gone shows the image or the architecture, not what the network learnt. Nie et al.
(ICML 2018) showed that the deconvnet and guided backprop partly reconstruct the image whatever the weights.

Cascading randomisation as Quantus's ``MPRT`` runs it (so its numbers are the oracle of the tests): the modules
that have ``reset_parameters`` (convolutions, linear layers, batch norms), from the top (the last registered)
down, each re-initialised by its own ``reset_parameters`` with torch's generator seeded at ``seed + 1``,
cumulatively (``top_down``) or one at a time (``independent``). For each method (the deconvnet, guided
backprop and the plain gradient, seeded at the class's logit as the pointing game seeds them, and occlusion's
map of p(class)), for the same images and classes, the map of every randomised model against the trained one's:
Spearman rank correlation of the absolute maps and of the signed ones, SSIM (Wang et al. 2004, a Gaussian window
of sigma 1.5, on maps scaled by their largest absolute value), and the Spearman correlation of the map with the
image itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .analyses import SPLIT_HELP, Analysis, existing, register
from .deconvnet import Projector
from .errors import ConvscopeError, check_int, check_seed, unknown
from .findings import finding, mean_contrast, paired_contrast
from .layout import Layout
from .occluders import default_square, occluded_probs
from .tables import TextTable

if TYPE_CHECKING:
    from .run import Run

METHODS = ("deconvnet", "guided", "gradient", "occlusion")
ORDERS = ("top_down", "independent")


def randomised(model: nn.Module, order: str = "top_down", seed: int = 42) -> Iterator[tuple[str, nn.Module]]:
    """(module name, a copy of ``model`` with that module re-initialised): every module with
    ``reset_parameters``, from the top down; ``top_down`` keeps the layers above randomised too (cascading),
    ``independent`` restores them. Quantus's ``get_random_layer_generator``, with the caller's random state kept."""
    if order not in ORDERS:
        raise unknown("layer order", order, ORDERS)
    copied = copy.deepcopy(model)
    original = copy.deepcopy(copied.state_dict())
    modules = [(name, m) for name, m in copied.named_modules() if hasattr(m, "reset_parameters")][::-1]
    for name, module in modules:
        if order == "independent":
            copied.load_state_dict(original)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            module.reset_parameters()
        yield name, copied


def class_maps(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, method: str, output: str,
               n_classes: int, nonlinearities: str = "error") -> torch.Tensor:
    """Each image's map for its class, (N, C, H, W): a projection from the class's logit seeded with 1, or, for
    occlusion, the drop of p(class) under a grey square centred at each pixel's nearest square (all channels)."""
    if method == "occlusion":
        return torch.stack([_occlusion_map(model, image, int(c)) for image, c in zip(images, classes)])
    seed = torch.zeros(len(images), n_classes)
    seed[torch.arange(len(images)), classes] = 1.0
    return Projector(model, method, nonlinearities).project(images, output, grad_output=seed)


def _occlusion_map(model: nn.Module, image: torch.Tensor, cls: int) -> torch.Tensor:
    size, stride = default_square(image.shape[-1])
    positions, probs, clean = occluded_probs(model, image, size, stride)
    drop = (clean[cls] - probs[:, cls]).view(1, 1, *positions.shape[:2])
    return F.interpolate(drop, size=image.shape[-2:], mode="nearest")[0].expand(image.shape[0], -1, -1).clone()


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row of (N, D) arrays, Spearman's rank correlation (scipy's, ties ranked by their mean)."""
    from scipy.stats import spearmanr

    return np.array([spearmanr(x, y)[0] for x, y in zip(a, b)])


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per pair of (N, C, H, W) maps, the mean SSIM over channels and pixels (Wang et al. 2004: a Gaussian window
    of sigma 1.5 and 11 px, K1 0.01, K2 0.03, the sample covariance as scikit-image's ``structural_similarity``
    with ``gaussian_weights=True`` computes it), over the interior where the window fits."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-x * x / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(c, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, window, groups=c)

    ux, uy = blur(a), blur(b)
    n = 11 * 11
    cov = n / (n - 1)  # the sample covariance, as scikit-image
    vx, vy = cov * (blur(a * a) - ux * ux), cov * (blur(b * b) - uy * uy)
    vxy = cov * (blur(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def _scaled(m: torch.Tensor) -> torch.Tensor:
    return m / m.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1, 1)


@dataclass
class SanityResult:
    """Per method: the maps of the trained model and after each randomisation step (``maps[method][step]``,
    step 0 the trained model), and per step the per-image measures against the trained maps."""

    layers: list[str]  # the randomised modules, in order; step i randomises layers[:i] (top_down) or layers[i-1]
    order: str
    seed: int
    images: torch.Tensor
    classes: torch.Tensor
    maps: dict[str, list[torch.Tensor]]
    spearman_abs: dict[str, np.ndarray]  # (steps, N)
    spearman: dict[str, np.ndarray]
    ssim: dict[str, np.ndarray]
    image_correlation: dict[str, np.ndarray]  # (steps + 1, N): the map against the image

    def table(self) -> dict:
        mean = lambda a: [float(np.nanmean(row)) for row in a]  # noqa: E731
        return {m: {"spearman_abs": mean(self.spearman_abs[m]), "spearman": mean(self.spearman[m]),
                    "ssim": mean(self.ssim[m]), "image_correlation": mean(self.image_correlation[m])}
                for m in self.maps}


def mprt(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, explain: Callable, order: str = "top_down",
         seed: int = 42, progress: bool | None = False) -> tuple[list[str], list[torch.Tensor]]:
    """The maps ``explain(model, images, classes)`` of the trained model, then of every randomised one
    (:func:`randomised`): the layers and the maps."""
    maps, names = [explain(model, images, classes).detach().cpu()], []
    total = sum(hasattr(m, "reset_parameters") for m in model.modules())
    # the generator changes one copy step by step: each step's maps are made before the next step
    for name, m in tqdm(randomised(model, order, seed), total=total, desc="randomise",
                        disable=None if progress is None else not progress):
        names.append(name)
        maps.append(explain(m, images, classes).detach().cpu())
    return names, maps


def compute(run: Run, n: int = 8, split: str | None = None, order: str = "top_down", seed: int = 42,
            progress: bool | None = None) -> SanityResult:
    """Cascading (or independent) randomisation of the run's model for the first ``n`` images of ``split`` and
    their true classes, every method of :data:`METHODS`."""
    check_int(n, "n", 1, 1000)
    check_seed(seed)
    if order not in ORDERS:
        raise unknown("layer order", order, ORDERS)
    data = run.split(split or run.default_split("test"))
    index = torch.arange(min(n, len(data)))
    x, _ = data.batch(index)
    classes, _ = run.targets(data, index)
    output = run.output_layer()
    layers, maps = None, {}
    for method in METHODS:
        def explain(model, images, cls, method=method):
            return class_maps(model, images, cls, method, output, len(run.classes), run.nonlinearities)

        layers, maps[method] = mprt(run.model, x, classes, explain, order, seed, progress)
    if not layers:
        raise ConvscopeError("the model has no module with reset_parameters to randomise")
    flat_image = x.flatten(1).numpy()
    measures: dict[str, dict[str, np.ndarray]] = {k: {} for k in ("abs", "signed", "ssim", "image")}
    for method, steps in maps.items():
        first = steps[0].flatten(1).numpy()
        measures["abs"][method] = np.stack([spearman(np.abs(first), np.abs(s.flatten(1).numpy())) for s in steps[1:]])
        measures["signed"][method] = np.stack([spearman(first, s.flatten(1).numpy()) for s in steps[1:]])
        measures["ssim"][method] = np.stack([ssim(_scaled(steps[0]), _scaled(s)).numpy() for s in steps[1:]])
        measures["image"][method] = np.stack([spearman(flat_image, s.flatten(1).numpy()) for s in steps])
    return SanityResult(layers, order, seed, x, classes, maps, measures["abs"], measures["signed"],
                        measures["ssim"], measures["image"])


def findings(result: SanityResult, depth: str = "fc6") -> list:
    """Adebayo et al. 2018, "Sanity checks for saliency maps", on the Spearman correlation of the absolute maps
    with the trained model's (per image): guided backprop's map stays closer to the trained one than the
    gradient's once the layers from the top through ``depth`` are randomised (their Fig. 2, 4: guided backprop
    barely changes); and, cascading to the bottom, every method's map changes once all layers are random.
    A model without ``depth`` is measured at every step, averaged per image."""

    rho = result.spearman_abs
    step = next((i for i, name in enumerate(result.layers) if name == depth or name.endswith("." + depth)), None)
    cascade = result.order == "top_down"
    where = ("every step of randomisation, averaged" if step is None else
             f"{'the layers from the top through' if cascade else 'only'} {result.layers[step]} randomised")

    def at(method):
        return rho[method].mean(0) if step is None else rho[method][step]

    out = []
    if "guided" in rho and "gradient" in rho:
        a, b = at("guided"), at("gradient")
        ok = np.isfinite(a) & np.isfinite(b)  # a constant map has no rank correlation
        out.append(finding(
            "sanity.guided_vs_gradient", f"guided backprop's map changes less than the gradient's with {where}",
            "Adebayo et al. 2018, Sanity checks for saliency maps", "sanity", paired_contrast(a[ok], b[ok], "images"),
            "Spearman(|map|, trained |map|): guided - gradient",
            "Inception v3, ImageNet: guided backprop's maps stay close to the trained ones, the gradient's do not",
            f"guided {a[ok].mean():.2f}, gradient {b[ok].mean():.2f} ({int(ok.sum())} images)"))
    if cascade:  # the last step of a cascade has every layer random
        for method, r in rho.items():
            last = r[-1][np.isfinite(r[-1])]
            contrast = mean_contrast(1 - last, unit="images")
            out.append(finding(
                f"sanity.{method}.all_random", f"{method}'s map changes once every layer is random",
                "Adebayo et al. 2018, Sanity checks for saliency maps", "sanity", contrast,
                "1 - Spearman(|map|, trained |map|), all layers random",
                "a map that explains the weights must change when they are all random",
                f"Spearman {last.mean():.2f} ({len(last)} images)" if len(last) else "no finite correlation"))
    return out


def sanity_figure(result: SanityResult, image: int = 0):
    """Adebayo et al.'s layout for one image: rows the methods, columns the image, the trained model's map, then
    the map after each step of randomisation (|map|, largest over colours; occlusion: the drop of p(class))."""
    from matplotlib.figure import Figure

    steps = len(result.layers) + 1
    fig = Figure(figsize=(1.1 * (steps + 1), 1.2 * len(result.maps) + 0.6))
    axes = fig.subplots(len(result.maps), steps + 1, squeeze=False)
    picture = result.images[image].clamp(0, 1).permute(1, 2, 0).numpy()
    titles = ["image", "trained", *(f"-{(name or 'all').split('.')[-1]}" for name in result.layers)]
    for row, (method, maps) in zip(axes, result.maps.items()):
        row[0].imshow(picture)
        row[0].set_ylabel(method, fontsize=8)
        for ax, m in zip(row[1:], maps):
            ax.imshow(m[image].abs().amax(0).numpy(), cmap="gray")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"Cascading randomisation ({result.order}, seed {result.seed}): each column re-initialises one more "
                 "module from the top", fontsize=8)
    fig.tight_layout()
    return fig


def sanity_table(result: SanityResult) -> str:
    """Per method, the mean Spearman correlation (absolute maps) with the trained model's map after each step."""
    t = result.table()
    return TextTable(("method (Spearman, abs maps)", "trained",
                      *(f"-{name or '(the whole model)'}" for name in result.layers)),
                     tuple((m, "1.000", *(f"{v:.3f}" for v in t[m]["spearman_abs"])) for m in result.maps),
                     f"{result.order} randomisation (seed {result.seed}), {len(result.classes)} images, their true "
                     "classes; each column randomises one more module from the top (-name). A faithful map falls to "
                     "0 as the weights go (Adebayo et al. 2018).").markdown()


def write_sanity(result: SanityResult, layout: Layout) -> list[Path]:
    """``sanity.png`` (Adebayo's layout), ``sanity.md`` (the table), ``sanity.json`` (every measure per image)."""
    numbers = {"layers": result.layers, "order": result.order, "seed": result.seed,
               "classes": result.classes.tolist(), "mean": result.table(),
               "per_image": {m: {"spearman_abs": result.spearman_abs[m].tolist(),
                                 "spearman": result.spearman[m].tolist(), "ssim": result.ssim[m].tolist(),
                                 "image_correlation": result.image_correlation[m].tolist()} for m in result.maps}}
    return [artifacts.save_figure(layout.figure("sanity"), sanity_figure(result)),
            artifacts.write_text(layout.figure("sanity", ".md"), sanity_table(result)),
            artifacts.write_json(layout.figure("sanity", ".json"), numbers)]


register(Analysis(
    "sanity", "sanity", "Adebayo et al. 2018", "Sanity check: the maps when the weights are randomised",
    "Not in the paper: the model's modules re-initialised from the top down, one more at a time (Quantus's "
    "MPRT), and each method's map of the same images compared with the trained model's (Spearman rank "
    "correlation of the absolute maps). A map that barely changes shows the image or the architecture, not "
    "what the network learnt: the deconvnet's critique (Adebayo et al. 2018, Nie et al. 2018), measured on "
    "this model.",
    files=lambda layout: (existing(layout.figure("sanity")), existing(layout.figure("sanity", ".md"))),
    compute=compute, write=write_sanity, projects=True, findings=findings,
    help={"n": "How many images (the first of the split).", "split": SPLIT_HELP,
          "order": "top_down: cascading, the layers above stay randomised (Adebayo's cascade); independent: "
                   "one layer at a time.",
          "seed": "Seed of the re-initialisation (Quantus's: torch seeded at seed + 1 per layer)."},
    summary=sanity_table))


__all__ = ["METHODS", "SanityResult", "class_maps", "compute", "findings", "mprt", "randomised", "sanity_figure",
           "sanity_table", "spearman", "ssim", "write_sanity"]
