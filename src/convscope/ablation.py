"""Architecture ablation (paper section 4, Table 3): the base model retrained with layers removed or resized, on
the same data, with the same budget and seed, each variant a resumable run of its own (``out_dir/<variant>``).

A finished variant is loaded, not retrained (``train`` does that); an interrupted one resumes from its last
finished epoch. Errors reported: **train** top-1 error is the final model's, evaluated in eval mode (no dropout,
no augmentation) on the whole training set -- how well the variant fits, which is what Table 3 contrasts with
validation error to show over-fitting; the running error of the last epoch would mix in dropout and the weights
of the whole epoch. **Val** top-1 and top-5 error are the final model's on the validation split.

Variants of a base with widths (w1..w5) and fc (f6, f7), named after the paper's rows:

========================  =========================================  ============================================
variant                   change                                     paper row (Table 3)
========================  =========================================  ============================================
full                      none                                       Our Model (as per Fig. 3)
no_conv34                 remove conv3, conv4                        Removed layers 3,4
no_fc7                    remove fc7                                 Removed layer 7
no_fc67                   remove fc6, fc7                            Removed layers 6,7
no_conv34_fc67            remove conv3, conv4, fc6, fc7              Removed layers 3,4,6,7
fc_half                   fc6, fc7 halved                            Adjust layers 6,7: 2048 units
fc_double                 fc6, fc7 doubled                           Adjust layers 6,7: 8192 units (our model)
wide_conv345              conv3-5 x 4/3, 8/3, 2 (384,384,256 ->      Adjust layers 3,4,5: 512,1024,512 maps
                          512,1024,512 in the paper)
wide_conv345_fc_double    both of the last two                       Adjust layers 6,7: 8192 units and Layers
                                                                     3,4,5: 512,1024,512 maps
========================  =========================================  ============================================

The paper ran the removals and the 2048-unit row on its replication of Krizhevsky's net, the rest on its own
model; the table shows each variant beside its paper row and that row's base.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import artifacts
from . import train as training
from .analyses import Analysis, existing, register
from .config import TrainConfig
from .errors import ConvscopeError, unknown
from .findings import Contrast, Finding, finding, proportion_contrast
from .layout import Layout
from .models import create_model
from .tables import TextTable

# From the paper's Table 3 (ImageNet 2012 validation set): train top-1, val top-1, val top-5 error (%).
PAPER_TABLE3: dict[str, tuple[float, float, float]] = {
    "Our replication of Krizhevsky et al., 1 convnet": (35.1, 40.5, 18.1),
    "Removed layers 3,4": (41.8, 45.4, 22.1),
    "Removed layer 7": (27.4, 40.0, 18.4),
    "Removed layers 6,7": (27.4, 44.8, 22.4),
    "Removed layers 3,4,6,7": (71.1, 71.3, 50.1),
    "Adjust layers 6,7: 2048 units": (40.3, 41.7, 18.8),
    "Adjust layers 6,7: 8192 units": (26.8, 40.0, 18.1),
    "Our Model (as per Fig. 3)": (33.1, 38.4, 16.6),
    "Our Model, adjust layers 6,7: 8192 units": (26.2, 40.0, 17.4),
    "Our Model, adjust layers 3,4,5: 512,1024,512 maps": (35.7, 37.5, 16.0),
    "Our Model, adjust layers 6,7: 8192 units and layers 3,4,5: 512,1024,512 maps": (40.0, 37.3, 15.5),
}
KRIZHEVSKY, OURS = "Our replication of Krizhevsky et al., 1 convnet", "Our Model (as per Fig. 3)"

# conv3-5 widths of the paper's widened row over its base: 384,384,256 -> 512,1024,512
WIDEN = (512 / 384, 1024 / 384, 512 / 256)


def _widen(w: Sequence[int]) -> tuple[int, ...]:
    return (w[0], w[1], *(round(x * r) for x, r in zip(w[2:], WIDEN)))


# variant -> (paper row, its base row, model options from the base spec's widths and fc)
VARIANTS: dict[str, tuple[str, str, Callable[[Any], dict[str, Any]]]] = {
    "full": (OURS, OURS, lambda s: {}),
    "no_conv34": ("Removed layers 3,4", KRIZHEVSKY, lambda s: {"remove": ["conv3", "conv4"]}),
    "no_fc7": ("Removed layer 7", KRIZHEVSKY, lambda s: {"remove": ["fc7"]}),
    "no_fc67": ("Removed layers 6,7", KRIZHEVSKY, lambda s: {"remove": ["fc6", "fc7"]}),
    "no_conv34_fc67": ("Removed layers 3,4,6,7", KRIZHEVSKY,
                       lambda s: {"remove": ["conv3", "conv4", "fc6", "fc7"]}),
    "fc_half": ("Adjust layers 6,7: 2048 units", KRIZHEVSKY, lambda s: {"fc": [f // 2 for f in s.fc]}),
    "fc_double": ("Our Model, adjust layers 6,7: 8192 units", OURS, lambda s: {"fc": [f * 2 for f in s.fc]}),
    "wide_conv345": ("Our Model, adjust layers 3,4,5: 512,1024,512 maps", OURS,
                     lambda s: {"widths": list(_widen(s.widths))}),
    "wide_conv345_fc_double": ("Our Model, adjust layers 6,7: 8192 units and layers 3,4,5: 512,1024,512 maps",
                               OURS, lambda s: {"widths": list(_widen(s.widths)), "fc": [f * 2 for f in s.fc]}),
}


@dataclass
class AblationRow:
    variant: str
    model_options: dict[str, Any]
    params: int
    train_top1_err: float
    val_top1_err: float
    val_top5_err: float
    paper_row: str
    paper: tuple[float, float, float]  # train top-1, val top-1, val top-5 (%)
    paper_base: tuple[float, float, float]
    run_dir: str
    val_images: int = 0  # how many images the val errors are over (0: not recorded), for their intervals


@dataclass
class AblationResult:
    """Paper Table 3 on the base config: one row per variant."""

    base: dict[str, Any]
    rows: list[AblationRow]

    def row(self, variant: str) -> AblationRow:
        for r in self.rows:
            if r.variant == variant:
                return r
        raise unknown("variant", variant, [r.variant for r in self.rows])

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "train_error": "final model, eval mode, whole training set",
                "source": "paper Table 3, ImageNet 2012 validation set",
                "rows": [r.__dict__ for r in self.rows]}


def variant_config(base_cfg: TrainConfig, variant: str) -> TrainConfig:
    """The base config with the variant's model options (same data, budget and seed)."""

    if variant not in VARIANTS:
        raise unknown("variant", variant, list(VARIANTS))
    spec = getattr(create_model(base_cfg.model, num_classes=2, **base_cfg.model_options), "spec", None)
    if spec is None:
        raise ConvscopeError(f"model {base_cfg.model!r} is not a ZF-style net; Table 3's variants need one "
                             "of zfnet, alexnet, zfnet_small, alexnet_small")
    if spec.remove and variant != "full":
        raise ConvscopeError(f"the base model already removes {list(spec.remove)}; ablate from the full model")
    options = {**base_cfg.model_options, **VARIANTS[variant][2](spec)}
    return replace(base_cfg, model_options=options)


def ablate(base_cfg: TrainConfig, out_dir: str | os.PathLike, variants: Sequence[str] | None = None,
           progress: bool | None = None) -> AblationResult:
    """Paper Table 3: train every variant of ``base_cfg`` into ``out_dir/<variant>`` (resuming, or loading a
    finished one) and measure its train and validation errors. The data are loaded once and shared."""
    variants = list(variants) if variants is not None else list(VARIANTS)
    if not variants:
        raise ConvscopeError("no variants to train")
    configs = {v: variant_config(base_cfg, v) for v in variants}  # every bad name fails before any training
    base_cfg.validate()
    splits = training.load_data(base_cfg)
    out_dir = Path(out_dir)
    rows = []
    for v in variants:
        result = training.train(configs[v], out_dir / v, splits=splits, progress=progress)
        fit = training.evaluate(result.model, splits.train)
        last = result.metrics[-1]
        paper_row, base_row, _ = VARIANTS[v]
        rows.append(AblationRow(v, configs[v].model_options, sum(p.numel() for p in result.model.parameters()),
                                fit["top1_err"], last["val_top1_err"], last["val_top5_err"], paper_row,
                                PAPER_TABLE3[paper_row], PAPER_TABLE3[base_row], str(out_dir / v), len(splits.val)))
    return AblationResult(base_cfg.to_dict(), rows)


def two_proportions(hits: tuple[int, int], n: tuple[int, int]) -> Contrast:
    """``hits[0] / n[0] - hits[1] / n[1]`` of two independent proportions, with Newcombe's hybrid score interval
    (his method 10, from each proportion's Wilson interval): unlike Wald's it stays honest at an error of 0."""
    (x1, x2), (n1, n2) = hits, n
    (p1, (l1, u1)), (p2, (l2, u2)) = ((c.measured, c.interval) for c in
                                      (proportion_contrast(x1, n1, 0.0), proportion_contrast(x2, n2, 0.0)))
    d = p1 - p2
    lo, hi = d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)
    return Contrast(d, (lo, hi), n1 + n2, f"Newcombe hybrid score interval, {x1} of {n1} and {x2} of {n2} images")


def findings(result: AblationResult) -> list[Finding]:
    """Paper Table 3: removing layers 3,4 and 6,7 together costs far more than either alone (71.3 % val top-1
    error against 45.4 and 44.8). The contrast is the val error without both minus the larger of the two single
    removals, each an independent proportion over the val images (the same images for every variant, so the
    interval is if anything wide). None unless the three variants ran and their val sizes are recorded."""
    rows = {r.variant: r for r in result.rows}
    if not {"no_conv34", "no_fc67", "no_conv34_fc67"} <= set(rows) or not all(
            rows[v].val_images > 0 for v in ("no_conv34", "no_fc67", "no_conv34_fc67")):
        return []
    both = rows["no_conv34_fc67"]
    worse = max((rows["no_conv34"], rows["no_fc67"]), key=lambda r: r.val_top1_err)
    # The rows keep rates; over a known number of images they give back the counts exactly.
    hits = (round(both.val_top1_err * both.val_images), round(worse.val_top1_err * worse.val_images))
    contrast = two_proportions(hits, (both.val_images, worse.val_images))
    return [finding("table3.depth", "Removing layers 3,4 and 6,7 together costs far more than either alone",
                    "Zeiler & Fergus 2014, Table 3", "table3", contrast,
                    "val top-1 error without conv3-4 and fc6-7 minus without "
                    f"{'conv3-4' if worse.variant == 'no_conv34' else 'fc6-7'} alone (the larger single cost)",
                    f"{_val('Removed layers 3,4,6,7')} % vs {_val('Removed layers 3,4')} (3,4) and "
                    f"{_val('Removed layers 6,7')} (6,7)",
                    f"{100 * both.val_top1_err:.1f} % vs {100 * rows['no_conv34'].val_top1_err:.1f} (3,4) and "
                    f"{100 * rows['no_fc67'].val_top1_err:.1f} (6,7)")]


def ablation_table(result: AblationResult) -> str:
    """Table 3 as text: ours (errors %) beside the paper's row and the paper's base for that row."""
    rows = tuple((r.variant, f"{r.params / 1e6:.2f} M", f"{100 * r.train_top1_err:.1f}", f"{100 * r.val_top1_err:.1f}",
                  f"{100 * r.val_top5_err:.1f}", r.paper_row, " / ".join(f"{x:.1f}" for x in r.paper),
                  " / ".join(f"{x:.1f}" for x in r.paper_base)) for r in result.rows)
    b = result.base
    return TextTable(("variant", "params", "train top-1", "val top-1", "val top-5", "paper row",
                      "paper train / val top-1 / val top-5", "paper base"), rows,
                     f"errors in %; {b['model']} on {b['data']}, {b['epochs']} epochs, seed {b['seed']}; train "
                     "error: final model in eval mode on the whole training set. Paper: Table 3, ImageNet 2012 val."
                     ).markdown()


def ablation_figure(result: AblationResult):
    """Bars of train and val top-1 error per variant, with the paper's val top-1 of the matching row."""
    import numpy as np
    from matplotlib.figure import Figure

    x = np.arange(len(result.rows))
    fig = Figure(figsize=(max(6, 1.1 * len(x)), 4))
    ax = fig.subplots()
    ax.bar(x - 0.27, [100 * r.train_top1_err for r in result.rows], 0.27, label="train top-1 (ours)")
    ax.bar(x, [100 * r.val_top1_err for r in result.rows], 0.27, label="val top-1 (ours)")
    ax.bar(x + 0.27, [r.paper[1] for r in result.rows], 0.27, label="val top-1 (paper, ImageNet)", alpha=0.6)
    ax.set_xticks(x, [r.variant for r in result.rows], rotation=30, ha="right")
    ax.set_ylabel("top-1 error (%)")
    ax.set_title("Table 3: ablation")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_ablation(result: AblationResult, directory: str | os.PathLike) -> list[Path]:
    """``ablation.json``, ``ablation.md`` (the table) and ``ablation.png`` (bar chart) in ``directory``, the folder
    of the variant runs."""
    return [artifacts.write_json(Layout.ablation_path(directory, ".json"), result.to_dict()),
            artifacts.write_text(Layout.ablation_path(directory, ".md"), ablation_table(result)),
            artifacts.save_figure(Layout.ablation_path(directory, ".png"), ablation_figure(result))]


def ablate_run(base_cfg: TrainConfig, out_dir: str | os.PathLike, variants: Sequence[str] | None = None,
               progress: bool | None = None) -> tuple[AblationResult, list[Path]]:
    """CLI entry (``convscope ablate``): train the variants and write the table beside their runs."""
    result = ablate(base_cfg, out_dir, variants, progress)
    with artifacts.lock(out_dir, "convscope ablate"):
        return result, write_ablation(result, out_dir)



def _val(row: str) -> float:
    return PAPER_TABLE3[row][1]

register(Analysis(
    "ablate", "table3", "Table 3", "Ablation of the architecture",
    "The model retrained with layers removed or resized, same data, budget and seed (errors in %), here on "
    "the embedded pairs set: two discs far apart, of one colour or not, a task that needs a layer seeing "
    "both. The paper finds that depth matters: removing layers 3,4 and 6,7 together costs far more than "
    f"either alone ({_val('Removed layers 3,4,6,7')} % against {_val('Removed layers 3,4')} and "
    f"{_val('Removed layers 6,7')} on ImageNet). On pairs the net without both is left at "
    "chance (50 %) while either removal alone costs nothing; on the twelve-class synthetic set, whose "
    "classes need no such depth, the contrast does not appear.",
    files=lambda layout: (existing(layout.ablation_file(".png")), existing(layout.ablation_file(".md"))),
    make="convscope ablate --config pairs --out {run}/ablation",
    paper=[(("Our Model (as per Fig. 3): train top-1 / val top-1 / val top-5" if row.startswith("Our Model (")
             else row.removeprefix("Our Model, ").capitalize() if row.startswith("Our Model, ") else row),
            " / ".join(map(str, PAPER_TABLE3[row])))
           for row in ("Our Model (as per Fig. 3)", "Removed layers 3,4", "Removed layers 6,7",
                       "Removed layers 3,4,6,7", "Our Model, adjust layers 3,4,5: 512,1024,512 maps")]))
