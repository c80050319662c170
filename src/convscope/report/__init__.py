"""The static report of a run: one HTML page (``report.html``) with every figure and table of Zeiler & Fergus
that the run has, each captioned with the paper's figure or table and the paper's numbers beside convscope's.

The report computes nothing heavy: the registry of analyses (:data:`convscope.analyses.REGISTRY`) says which of
the run's files are which figure, the layout (:class:`convscope.layout.Layout`) where they are, and the
training curve is drawn from ``metrics.json``. Images stay files of the run, linked by percent-encoded URLs
relative to the page's own folder, so the page opens from ``file://`` with no server and stays small (inlined as
``data:`` URIs, the demo's figures made a 14.6 MB page; linked, 20 kB). Each image links to itself, for its full
size where the page shrinks it. There are no thumbnails: every panel is shown at up to the page's width, and
page-wide copies of the demo's Fig. 2 panels saved only a third of their bytes, while the page already loads
with all its images in about 0.3 s. A missing artifact is listed with the command that makes it. The page is
rendered with autoescaping: names from the run (classes, layers, config values) appear as text.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import artifacts
from ..analyses import REGISTRY, Analysis, written
from ..checkpoint import load_model
from ..errors import ConvscopeError, printable
from ..findings import interval_text, read_findings, seeds_text
from ..layers import paper_names
from ..layout import Layout
from ..run import open_run
from ..tables import blocks
from ..train import PAPER_TABLE2, metrics_ok, result_ok


def require_run(run_dir: str | Path) -> Path:
    """The run directory, resolved; a directory without ``config.json`` or ``attach.json`` is not a run."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConvscopeError(f"{str(path)!r} is not a directory; pass a run directory made by `convscope train`, "
                             "`convscope attach` or `convscope demo`")
    if not Layout(path).is_run():
        raise ConvscopeError(f"{str(path)!r} is not a convscope run (no config.json or attach.json); make one with "
                             "`convscope train --out DIR`, `convscope attach ... --out DIR` or `convscope demo`")
    return path.resolve()


def label_of(path: Path, run_dir: Path, key: str = "") -> str:
    """A short label for one image of analysis ``key``: ``fig2_conv5.png`` -> ``conv5``; a file not named after
    the key, by its path in the run."""
    if key and path.stem.startswith(key + "_"):
        return path.stem[len(key) + 1:]
    return path.relative_to(run_dir).with_suffix("").as_posix().removeprefix("figures/")


def relative_url(path: Path, folder: Path) -> str:
    """``path`` as a URL relative to ``folder`` (the page's), percent-encoded: names from the run may hold spaces,
    ``#``, ``?``, ``%`` or non-ASCII, which a browser would otherwise read as a fragment, a query or an escape."""
    return quote(Path(os.path.relpath(path, folder)).as_posix())


def model_summary(layout: Layout, damaged: list[dict] | None = None) -> dict[str, Any] | None:
    """Layers and parameter counts of the run's model (a trained run's final weights or latest checkpoint; an
    attached run's model as it reopens), with its classes. A weights file that does not load is added to
    ``damaged`` (with the command that writes it again), and the summary says which older file it shows."""

    if layout.attach.is_file():

        try:
            run = open_run(layout.root)
            reached = [i.name for i in sorted(run.modules, key=lambda i: i.order) if i.calls]
        except ConvscopeError:
            return None
        return _summary(run.model, run.attached.get("weights") or "the model given to cs.attach", None, run.classes,
                        reached)
    candidates = [layout.final, *sorted(layout.saved_epochs().values(), reverse=True)]
    shown = f"'{layout.root}'" if " " in str(layout.root) else str(layout.root)
    for path in candidates:
        if not path.is_file():
            continue
        try:
            model, info = load_model(path)
        except ConvscopeError as e:
            if damaged is not None:
                damaged.append({"file": path.relative_to(layout.root).as_posix(),
                                "problem": f"not loadable ({str(e).splitlines()[0][:160]})",
                                "command": f"convscope train --config {shown}/config.json --out {shown}"})
            continue
        return _summary(model, path.relative_to(layout.root).as_posix(), info["epoch"], info["classes"])
    return None


def _summary(model, source: str, epoch: int | None, classes: list[str], reached: list[str] | None = None
             ) -> dict[str, Any]:
    """``reached``: the modules in the order the forward pass reaches them (default: as the model declares them)."""
    rows = []
    for name, module in model.named_modules():
        if list(module.children()) or not name:
            continue
        n = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append({"name": name, "kind": type(module).__name__, "detail": module.extra_repr(), "params": n})
    aliases = paper_names(model)
    order = {name: i for i, name in enumerate(reached or [name for name, _ in model.named_modules() if name])}
    order.update({alias: order[name] for alias, name in aliases.items() if name in order})
    return {"source": source, "epoch": epoch, "classes": classes, "rows": rows,
            "params": sum(p.numel() for p in model.parameters()),
            "paper_names": aliases, "order": order}


def training_curve(layout: Layout, metrics: list[dict[str, float]]) -> Path | None:
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
    return artifacts.save_figure(layout.curve, fig, dpi=110)


PNG = b"\x89PNG\r\n\x1a\n"


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class RunFiles:
    """What a run's record files say, each checked before it is shown: ``damaged`` lists every file that is
    missing where it should not be, or unreadable, or of the wrong shape, with the command that rebuilds it."""

    attached: dict | None
    config: dict
    metrics: list[dict]
    test: dict | None
    timings: dict | None
    damaged: list[dict] = field(default_factory=list)


def read_run(layout: Layout) -> RunFiles:
    """The run's config (or attachment), metrics, test result and timings, each validated; and what is damaged,
    including figures the manifest says an analysis wrote that are gone or are not PNG files."""
    shown = f"'{layout.root}'" if " " in str(layout.root) else str(layout.root)
    retrain = f"convscope train --config {shown}/config.json --out {shown}"
    damaged: list[dict] = []

    def check(path: Path, ok, command: str):
        value, problem = artifacts.read_record(path, ok)
        if problem:
            damaged.append({"file": path.relative_to(layout.root).as_posix(), "problem": problem, "command": command})
        return value

    attached = check(layout.attach, lambda v: isinstance(v, dict) and isinstance(v.get("classes"), list),
                     "convscope attach ... (again, into a new directory)")
    config = attached or check(layout.config, lambda v: isinstance(v, dict), "restore it, or train the run again")
    metrics = check(layout.metrics, metrics_ok, retrain)
    test = check(layout.test, result_ok, retrain)
    timings = check(layout.timings, lambda v: isinstance(v, dict) and all(_number(t) for t in v.values()),
                    f"convscope demo --out {shown}")
    for analysis in REGISTRY:  # each analysis's own records (its JSON, the scan's tensors)
        for path, problem in analysis.check(layout) if analysis.check else []:
            damaged.append({"file": path.relative_to(layout.root).as_posix(), "problem": problem,
                            "command": analysis.command.format(run=shown)})
    if layout.manifest.exists() and not isinstance(artifacts.read_json(layout.manifest), dict):
        damaged.append({"file": layout.manifest.name, "problem": "not valid JSON (so the check for missing figures "
                        "is off)", "command": "run the analyses again; each adds its files to it"})
    recorded = written(layout)
    for analysis in REGISTRY:
        for rel in recorded.get(analysis.key, []):
            path = layout.root / rel
            problem = "missing" if not path.is_file() else "not a PNG image" if path.suffix == ".png" and not _png(
                path) else None
            if problem:
                damaged.append({"file": rel, "problem": problem, "command": analysis.command.format(run=shown)})
    return RunFiles(attached, config or {}, metrics or [], test, timings, damaged)


def _png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


def sections(layout: Layout, src, order: dict[str, int] | None = None) -> tuple[list[dict], list[Analysis]]:
    """Per registered analysis that the run has: its images (label, ``src(path)``; PNG files only; one per layer in
    the ``order`` the forward pass reaches the layers, where it is known) and text tables; and the analyses it has
    not."""
    found, missing = [], []
    for analysis in REGISTRY:
        images, texts = analysis.files(layout)
        images = [p for p in images if _png(p)]
        if analysis.per_layer and order:
            layer = {p: label_of(p, layout.root, analysis.key).partition("#")[0] for p in images}
            images.sort(key=lambda p: order.get(layer[p], len(order)))  # stable: the unknown stay as they were
        if not images and not texts:
            missing.append(analysis)
            continue
        found.append({"entry": analysis, "paper": list(analysis.paper),
                      "images": [{"label": printable(label_of(p, layout.root, analysis.key)), "src": src(p)}
                                 for p in images],
                      "texts": [{"label": p.relative_to(layout.root).as_posix(),
                                 "blocks": blocks(printable(p.read_text(errors="replace")))} for p in texts]})
    return found, missing


def collect(run_dir: str | Path, out: str | Path | None = None, pending: Sequence[str] = ()) -> dict[str, Any]:
    """Everything the report shows, read from the run: the context of the report template. Image URLs are
    relative to the folder of ``out``, where the page will be (default the run's ``report.html``). Both paths are
    taken as given, not resolved: a browser applies a URL's ``..`` to the page's own path before the system
    follows any symlink, so the page opened where it was written finds its images. ``pending``: the steps
    ``convscope demo`` has still to run after this page, its first report (it writes the page again after them)."""
    given = Path(os.path.abspath(run_dir))
    layout = Layout(require_run(run_dir))
    run_dir = layout.root
    folder = Path(os.path.abspath(out)).parent if out is not None else given
    files = read_run(layout)
    config, metrics, test, timings = files.config, files.metrics, files.test, files.timings
    shown = f"'{run_dir}'" if " " in str(run_dir) else str(run_dir)

    def src(p: Path) -> str:
        return relative_url(given / p.relative_to(run_dir), folder)

    model = model_summary(layout, files.damaged)
    found, absent = sections(layout, src, model["order"] if model else None)
    findings, findings_seeds = _findings(layout, files.damaged, shown)
    missing = [{"ref": a.ref, "title": a.title, "command": a.command.format(run=shown)} for a in absent]
    retrain = f"convscope train --config {shown}/config.json --out {shown}"
    if files.attached is None:
        if not metrics and not layout.metrics.exists():
            missing.insert(0, {"ref": "training", "title": "training curve (metrics.json)", "command": retrain})
        if test is None and not layout.test.exists():
            missing.insert(0, {"ref": "Table 2", "title": "test error (test.json)", "command": retrain})
    curve = training_curve(layout, metrics) if metrics else None
    classes = [printable(c) for c in (model["classes"] if model else (config.get("classes") or []))]
    last = metrics[-1] if metrics else None
    gradient = config.get("nonlinearities") == "gradient"
    return {
        "run_name": printable(run_dir.name), "run_dir": printable(run_dir), "config": config,
        "attached": files.attached is not None,
        "config_json": printable(json.dumps(config, indent=2, sort_keys=True)), "metrics": metrics, "last": last,
        "test": test, "paper_table2": PAPER_TABLE2, "curve": src(curve) if curve else None,
        "model": model, "classes": classes, "sections": found, "missing": missing, "damaged": files.damaged,
        "gradient_note": {a.key: NONLINEARITY_NOTE for a in REGISTRY if a.projects} if gradient else {},
        "findings": findings, "findings_seeds": findings_seeds,
        "pending": list(pending), "timings": timings, "timings_total": sum(timings.values()) if timings else None,
        "train_seconds": sum(m.get("seconds", 0.0) for m in metrics),
    }


def _findings(layout: Layout, damaged: list[dict], shown: str) -> tuple[list[dict], int]:
    """The rows of the findings table (the demo's over several seeds where it measured them), and how many seeds;
    a damaged findings file is listed with the damaged files, never half-read."""

    path = layout.shown_findings()
    try:
        findings = read_findings(path)
    except ConvscopeError:
        damaged.append({"file": path.relative_to(layout.root).as_posix(), "problem": "not readable",
                        "command": f"the analyses again (convscope demo --out {shown}, or each analysis command): "
                                   "each rewrites its own entries"})
        return [], 1
    rows = [{"claim": printable(f.claim), "source": printable(f.source), "contrast": printable(f.contrast),
             "paper": printable(f.paper), "value": printable(f.value), "interval": interval_text(f), "n": f.n,
             "method": printable(f.method), "verdict": f.verdict, "seeds_text": seeds_text(f)} for f in findings]
    return rows, max((f.seeds for f in findings), default=1)


NONLINEARITY_NOTE = ("This run was attached with --nonlinearities gradient: the projections pass the model's "
                     "nonlinearities other than ReLU by their plain gradient, since deconvnet and guided "
                     "backpropagation have rules for ReLU only.")


def environment():
    """The jinja2 environment of the report and viewer templates (autoescaped: run text shows as text)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("convscope.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda x: f"{100 * x:.1f}"
    env.filters["thousands"] = lambda n: f"{n:,}"
    return env


def render_report(run_dir: str | Path, out: str | Path | None = None, pending: Sequence[str] = ()) -> str:
    """The report's HTML, without writing it; its image URLs are relative to ``out``'s folder (see :func:`collect`)."""
    return environment().get_template("report.html").render(**collect(run_dir, out, pending))


def build_report(run_dir: str | Path, out: str | Path | None = None, pending: Sequence[str] = ()) -> Path:
    """Write the run's static report (default ``<run>/report.html``) and return its path. Its images are the
    run's files, linked relative to where the page is written (``out`` may be outside the run): to move or mail
    the page, take the run directory with it. Draws ``figures/training_curve.png`` from the metrics. ``pending``:
    see :func:`collect`."""
    root = require_run(run_dir)
    with artifacts.lock(root, "convscope report"):
        return artifacts.write_text(Path(out) if out is not None else Layout(root).report,
                                    render_report(run_dir, out, pending))


__all__ = ["REGISTRY", "RunFiles", "build_report", "collect", "read_run", "render_report", "require_run"]
