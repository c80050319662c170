"""The static report of a run: one HTML page (``report.html``) with every figure and table of Zeiler & Fergus
that the run has, each captioned with the paper's figure or table and the paper's numbers beside convscope's.

The report computes nothing heavy: it reads the artifacts the analyses wrote (see :data:`REGISTRY`, the one
place that says which file is which figure) and draws the training curve from ``metrics.json``. Images are
inlined as ``data:`` URIs, so the page opens from ``file://`` on its own. A missing artifact is listed with
the command that makes it. The page is rendered with autoescaping: names from the run (classes, layers,
config values) appear as text.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import artifacts
from ..errors import ConvscopeError

CONFIG, METRICS, TEST, FINAL, TIMINGS = "config.json", "metrics.json", "test.json", "model.safetensors", "timings.json"
CURVE = "figures/training_curve.png"
REPORT = "report.html"

# The paper's numbers (Zeiler & Fergus, ECCV 2014; ImageNet 2012 unless said otherwise), shown beside the run's.
# Errors and accuracies in %. Key: the registry entry they belong to.
# Table 2's rows are (what, top-1 error, top-5 error); the others (what, value).
PAPER: dict[str, list[tuple[str, ...]]] = {
    "table2": [("ZF single model (Fig. 3), val", "38.4", "16.5"),
               ("AlexNet replication, val", "40.5", "18.1"),
               ("ZF ensemble of 6 nets, test", "", "14.8")],
    "table1": [("layer 5: right eye / left eye / nose", "0.067 / 0.069 / 0.079"),
               ("layer 5: random regions", "0.107"),
               ("layer 7: eyes, nose and random", "0.068 - 0.073")],
    "table3": [("Our Model (as per Fig. 3): train top-1 / val top-1 / val top-5", "33.1 / 38.4 / 16.6"),
               ("Removed layers 3,4", "41.8 / 45.4 / 22.1"),
               ("Removed layers 6,7", "27.4 / 44.8 / 22.4"),
               ("Removed layers 3,4,6,7", "71.1 / 71.3 / 50.1"),
               ("Adjust layers 3,4,5: 512,1024,512 maps", "35.7 / 37.5 / 16.0")],
    "transfer": [("Caltech-101, 15 / 30 per class, pretrained (accuracy)", "83.8 / 86.5"),
                 ("Caltech-101, 15 / 30 per class, from scratch", "22.8 / 46.5"),
                 ("PASCAL 2012 (Table 6), mean accuracy", "79.0")],
    "table7": [("Caltech-101 linear SVM, layer 1 (accuracy)", "44.8"),
               ("Caltech-101 linear SVM, layer 5 (accuracy)", "86.2")],
}


@dataclass(frozen=True)
class Entry:
    """One figure or table of the paper: the run files that hold it (globs relative to the run directory,
    images and text tables), its caption, and the command that makes it (``{run}``: the run directory)."""

    key: str
    ref: str
    title: str
    caption: str
    command: str
    images: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()


# The artifact registry: which files of a run are which figure of the paper, in the paper's order (where the
# run-level entry points of runs.py, ablation, probes and transfer write them); the report and the viewer both
# read this list.
REGISTRY: list[Entry] = [
    Entry("fig2", "Fig. 2", "Feature visualisation",
          "Per layer, a subset of feature maps; per map its top-9 activations over the validation set, each "
          "projected to pixels by the deconvnet (left 3x3), beside the image patches under them (right 3x3).",
          "convscope scan {run}", images=("figures/fig2_*.png",)),
    Entry("fig4", "Fig. 4", "Evolution of features during training",
          "Per layer, a few maps (rows) at the saved epochs (columns): the strongest activation over training "
          "images, projected. Lower layers settle in a few epochs, upper layers much later.",
          "convscope evolution {run}", images=("figures/fig4_*.png",)),
    Entry("fig5", "Fig. 5", "Invariance to translation, scale and rotation",
          "Distance between the feature vectors of original and transformed images at layer 1 and layer 7, and "
          "the probability of the true label, as the image is translated, scaled and rotated.",
          "convscope invariance {run}",
          images=("figures/fig5*.png",)),
    Entry("fig6", "Fig. 6", "Architecture diagnosis of layers 1 and 2",
          "Layer-1 filters with and without filter renormalisation, and with a large (11x11, stride 4) vs the "
          "paper's smaller (7x7, stride 2) first layer.",
          "convscope filters {run}",
          images=("figures/fig6.png",)),
    Entry("fig7", "Fig. 7", "Occlusion sensitivity",
          "A grey square slid over the image: (b) total activation of the strongest layer-5 map, (c) its "
          "projection, (d) probability of the correct class, (e) most probable class, per occluder position.",
          "convscope occlusion {run}",
          images=("figures/fig7.png",)),
    Entry("table1", "Table 1", "Correspondence of object parts",
          "The same part masked in 5 images of one class, or random regions: Delta, the mean sign change of the "
          "feature differences over image pairs. Lower than random means the parts are encoded consistently.",
          "convscope correspondence {run}",
          texts=("figures/table1.txt",)),
    Entry("table3", "Table 3", "Ablation of the architecture",
          "The model retrained with layers removed or resized, same data, budget and seed (errors in %), here on "
          "the embedded pairs set: two discs far apart, of one colour or not, a task that needs a layer seeing "
          "both. The paper finds that depth matters: removing layers 3,4 and 6,7 together costs far more than "
          "either alone (71.3 % against 45.4 and 44.8 on ImageNet). On pairs the net without both is left at "
          "chance (50 %) while either removal alone costs nothing; on the twelve-class synthetic set, whose "
          "classes need no such depth, the contrast does not appear.",
          "convscope ablate --config pairs --out {run}/ablation",
          images=("ablation/ablation.png",), texts=("ablation/ablation.md",)),
    Entry("transfer", "Tables 4-5, Fig. 9", "Transfer to small data sets",
          "Layers 1-7 kept fixed and a new softmax trained on n examples per class, on fc7 as in the paper and "
          "on conv1..fc7 joined, against the same net trained from scratch on those examples (mean per-class "
          "accuracy over folds).",
          "convscope transfer {run}",
          images=("transfer/*/transfer.png",), texts=("transfer/*/transfer.md",)),
    Entry("table7", "Table 7", "Discriminative power of each layer",
          "A linear SVM and a softmax on the features of one layer at a time: accuracy rises with depth.",
          "convscope probe-layers {run}",
          images=("probes/probes.png",), texts=("probes/probes.md",)),
]


def natural_key(text: str) -> list:
    """Sort key that puts conv2 before conv10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def require_run(run_dir: str | Path) -> Path:
    """The run directory, resolved; a directory without ``config.json`` is not a run."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConvscopeError(f"{str(path)!r} is not a directory; pass a run directory made by `convscope train` "
                             "or `convscope demo`")
    if not (path / CONFIG).is_file():
        raise ConvscopeError(f"{str(path)!r} is not a convscope run (no {CONFIG}); make one with "
                             "`convscope train --out DIR` or `convscope demo`")
    return path.resolve()


def find(run_dir: Path, globs: tuple[str, ...]) -> list[Path]:
    """The files under ``run_dir`` that match any of ``globs``, without duplicates, in natural order."""
    found: dict[Path, None] = {}
    for pattern in globs:
        for p in sorted(run_dir.glob(pattern), key=lambda p: natural_key(p.as_posix())):
            if p.is_file() and not p.name.startswith("."):
                found.setdefault(p, None)
    return list(found)


def label_of(path: Path, run_dir: Path) -> str:
    """A short label for one image of an entry: ``fig2_conv5.png`` -> ``conv5``."""
    stem = path.stem
    for prefix in ("fig2_", "fig4_", "fig5_", "fig6_", "fig7_"):
        if stem.startswith(prefix):
            return stem[len(prefix):]
    return path.relative_to(run_dir).with_suffix("").as_posix().removeprefix("figures/")


def read_json(path: Path) -> Any | None:
    """A JSON artifact, or None when it is missing or unreadable (an unfinished write, say)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def model_summary(run_dir: Path) -> dict[str, Any] | None:
    """Layers and parameter counts of the run's final model (or its latest checkpoint), with its classes."""
    from ..checkpoint import load_model

    candidates = [run_dir / FINAL] + sorted((run_dir / "checkpoints").glob("epoch_*.safetensors"), reverse=True)
    for path in candidates:
        if not path.is_file():
            continue
        try:
            model, info = load_model(path)
        except ConvscopeError:
            continue
        rows = []
        for name, module in model.named_modules():
            if list(module.children()) or not name:
                continue
            n = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append({"name": name, "kind": type(module).__name__, "detail": module.extra_repr(), "params": n})
        return {"source": path.relative_to(run_dir).as_posix(), "epoch": info["epoch"], "classes": info["classes"],
                "rows": rows, "params": sum(p.numel() for p in model.parameters()),
                "paper_layers": dict(getattr(model, "paper_layers", {}))}
    return None


def training_curve(run_dir: Path, metrics: list[dict[str, float]]) -> Path | None:
    """Draw train and validation error per epoch into ``figures/training_curve.png`` (Agg, no display)."""
    from matplotlib.figure import Figure

    rows = [m for m in metrics if "epoch" in m]
    if not rows:
        return None
    epochs = [m["epoch"] for m in rows]
    fig = Figure(figsize=(8, 3.2))
    ax_err, ax_loss = fig.subplots(1, 2)
    for key, label, style in (("train_top1_err", "train top-1", "-"), ("val_top1_err", "val top-1", "-"),
                              ("val_top5_err", "val top-5", "--")):
        if all(key in m for m in rows):
            ax_err.plot(epochs, [100 * m[key] for m in rows], style, label=label)
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error per epoch")
    ax_err.legend(frameon=False)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if all(key in m for m in rows):
            ax_loss.plot(epochs, [m[key] for m in rows], label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss per epoch")
    ax_loss.legend(frameon=False)
    for ax in (ax_err, ax_loss):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return artifacts.save_figure(run_dir / CURVE, fig, dpi=110)


def collect(run_dir: str | Path, inline: bool = True) -> dict[str, Any]:
    """Everything the report shows, read from the run: the context of the report template. ``inline``: images
    as data: URIs (else paths relative to the run directory)."""
    run_dir = require_run(run_dir)
    config = read_json(run_dir / CONFIG) or {}
    metrics = read_json(run_dir / METRICS) or []
    test = read_json(run_dir / TEST)
    timings = read_json(run_dir / TIMINGS)
    shown = f"'{run_dir}'" if " " in str(run_dir) else str(run_dir)

    def src(p: Path) -> str:
        return data_uri(p) if inline else p.relative_to(run_dir).as_posix()

    sections, missing = [], []
    for entry in REGISTRY:
        images, texts = find(run_dir, entry.images), find(run_dir, entry.texts)
        if not images and not texts:
            missing.append({"ref": entry.ref, "title": entry.title, "command": entry.command.format(run=shown)})
            continue
        sections.append({"entry": entry, "paper": PAPER.get(entry.key, []),
                         "images": [{"label": label_of(p, run_dir), "src": src(p)} for p in images],
                         "texts": [{"label": p.relative_to(run_dir).as_posix(), "text": p.read_text(errors="replace")}
                                   for p in texts]})
    if not metrics:
        missing.insert(0, {"ref": "training", "title": "training curve (metrics.json)",
                           "command": f"convscope train --out {shown}"})
    if test is None:
        missing.insert(0, {"ref": "Table 2", "title": "test error (test.json)",
                           "command": f"convscope train --out {shown}"})
    curve = training_curve(run_dir, metrics) if metrics else None
    model = model_summary(run_dir)
    classes = model["classes"] if model else (config.get("classes") or [])
    last = metrics[-1] if metrics else None
    return {
        "run_name": run_dir.name, "run_dir": str(run_dir), "config": config,
        "config_json": json.dumps(config, indent=2, sort_keys=True), "metrics": metrics, "last": last,
        "test": test, "paper_table2": PAPER["table2"], "curve": src(curve) if curve else None,
        "model": model, "classes": classes, "sections": sections, "missing": missing,
        "timings": timings if isinstance(timings, dict) else None,
        "timings_total": sum(v for v in timings.values() if isinstance(v, int | float))
        if isinstance(timings, dict) else None,
        "train_seconds": sum(m.get("seconds", 0.0) for m in metrics),
    }


def environment():
    """The jinja2 environment of the report and viewer templates (autoescaped: run text shows as text)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("convscope.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda x: f"{100 * x:.1f}"
    env.filters["thousands"] = lambda n: f"{n:,}"
    return env


def render_report(run_dir: str | Path, inline: bool = True) -> str:
    """The report's HTML, without writing it."""
    return environment().get_template("report.html").render(**collect(run_dir, inline))


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's static report (default ``<run>/report.html``) and return its path. Images are inlined,
    so the file can be moved or mailed on its own. Draws ``figures/training_curve.png`` from the metrics."""
    html = render_report(run_dir)
    return artifacts.write_text(Path(out) if out is not None else require_run(run_dir) / REPORT, html)


__all__ = ["PAPER", "REGISTRY", "Entry", "build_report", "collect", "render_report", "require_run"]
