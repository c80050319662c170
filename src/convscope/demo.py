"""``convscope demo``: the whole paper on the embedded data, in one run directory with a report.

Steps (each timed into ``timings.json``): train zfnet_small with the paper's recipe and run the analyses over it
(probes included), then write a first report, of the main run, which lists the steps still to come: it is ready
after about 3 of the demo's 12 to 15 minutes. Then the comparisons: the Fig. 6 runs under ``compare/`` (alexnet_small
at the budget of zfnet_small's epoch-10 checkpoint, zfnet_small without filter renormalisation at the full
budget) and Fig. 6 again beside them; Table 1 again on a second run trained alike on ``synthetic-parts``, whose
eyes and noses keep one colour (``compare/zfnet_small-parts``); transfer to scikit-learn's digits, and to the
synthetic classes held out of a second pretraining on the other six (``compare/zfnet_small-six``); the Table 3
ablation on the embedded ``pairs`` set under ``ablation/``; then the full report. An interrupted demo started
again goes on where it stopped: trainings resume (a finished one is loaded), an analysis that ``timings.json``
records as done is not run again (delete its line, or the file, to redo it), and the full report is always
written anew.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from . import analyses, artifacts, correspondence, dissect, transfer
from .ablation import ablate_run
from .ablation import findings as ablation_findings
from .analyses import record
from .checkpoint import load_model
from .config import PRESETS, TrainConfig
from .correspondence import write_correspondence
from .cpu import release_freed_memory, resident_memory
from .data.synthetic import CLASSES
from .errors import check_int
from .findings import combine, findings_table, read_findings, write_findings
from .layout import Layout
from .report import build_report
from .run import open_run
from .train import train
from .transfer import write_transfer

FULL = TrainConfig()
# Pretraining for transfer to held-out classes (Tables 4-5 on the embedded data): the first six classes, the
# other six the target; about a minute. What it finds is in the README's table of findings.
SIX = TrainConfig(classes=CLASSES[:6], n_train=6000, n_val=600, n_test=600, epochs=15, batch_size=64)
QUICK = TrainConfig(n_train=1200, n_val=240, n_test=240, epochs=2, batch_size=64)
# Table 3 on the embedded ``pairs`` set, whose class (two far-apart discs of one colour or not) needs a layer that
# sees both discs: conv3-4 or fc6-7 (see convscope.data.pairs). The named config "pairs": zfnet_small at half
# width, built for 128 px, 20 epochs of 2000 images, about a minute a variant. On the twelve-class synthetic set
# the contrast does not show at any budget tried: its classes need no such depth (README, Table 3's row).
PAIRS = PRESETS["pairs"]
ABLATION = ("full", "no_conv34", "no_fc67", "no_conv34_fc67")
ABLATION_QUICK = ("full", "no_conv34")
# Table 1 on parts that correspond: the main run's recipe and budget on ``synthetic-parts`` (every eye and nose in
# one colour of its own), into compare/zfnet_small-parts (about 4 minutes). The README's Table 1 row gives what it
# finds; at SIX's budget, and for the main run on ``synthetic``, no part differs from random regions.
PARTS_RUN = replace(FULL, data="synthetic-parts")
# Table 1's draws of 5 images and of random regions: the random regions' Delta varies most from draw to draw, and
# 10 draws left its mean 0.22 on one machine and 0.28 on another; 50 take under a second.
TABLE1_DRAWS = 50
COMPARE_EPOCHS = 10  # alexnet_small stops here; zfnet_small's checkpoints/epoch_010 is its like-for-like
# The run without renormalisation goes the whole 30 epochs: zfnet_small's layer 1 starts at std 0.03 and first
# reaches the 0.1 cap between epochs 10 and 20, so until then renormalisation does nothing (Fig. 6a's point).
# Until then the two runs are the same bit for bit: it starts from the main run's state there (``renorm_twin``).
AGAIN = ("train", "pretrain", "report")  # steps run on every start: a training resumes or loads, the report is new
FIRST_REPORT = "first report: the main run"  # once: on a later start, the comparisons' steps are the ones left


def steps(out: Path, quick: bool, seed: int = 0) -> list[tuple[str, Callable[[], object]]]:
    """The demo's steps in order: (name, thunk). :data:`AGAIN` names those that run on every start. ``seed`` is
    every training's seed (its initialisation, order, augmentation and dropout, and the generated data)."""

    def seeded(cfg: TrainConfig) -> TrainConfig:
        return replace(cfg, seed=seed)

    base = seeded(QUICK if quick else FULL)
    compare = replace(base, epochs=min(base.epochs, COMPARE_EPOCHS))
    n = 2 if quick else 5
    shots, folds, scratch_steps = ((1, 5), 2, 30) if quick else ((1, 5, 15), 3, 300)

    def analysis(name: str, **options):
        return lambda: analyses.get(name).run(open_run(out), **options)

    def table1_parts():
        run = open_run(out / "compare" / "zfnet_small-parts")
        result = analyses.get("correspondence").compute(run, draws=2 if quick else TABLE1_DRAWS)
        with artifacts.lock(out, "convscope demo"):  # shown in the main run's report, beside Table 1
            write_findings(Layout(out).findings, correspondence.findings(result, "table1_parts", "synthetic-parts"))
            return write_correspondence(result, Layout(out), "table1_parts",
                                        f"On synthetic-parts (every eye and nose in one colour of its own): "
                                        f"{run.name}, compare/zfnet_small-parts")

    def heldout():
        result = analyses.get("transfer").compute(open_run(out / "compare" / "zfnet_small-six"), target="heldout",
                                                  shots=shots, folds=folds, scratch_steps=scratch_steps)
        with artifacts.lock(out, "convscope demo"):
            write_findings(Layout(out).findings, transfer.findings(result))
            return write_transfer(result, Layout(out))  # shown in the main run's report

    def dissections():
        run = open_run(out)
        models = {f"epoch {e}": load_model(path)[0] for e, path in sorted(Layout(out).saved_epochs().items())}
        models.setdefault(f"epoch {run.config.epochs}", run.model)  # the final weights
        models["alexnet_small (10 ep)"] = open_run(out / "compare" / "alexnet_small").model
        models["no renorm (30 ep)"] = open_run(out / "compare" / "zfnet_small-norenorm").model
        data = run.split("val")
        data = data.subset(torch.arange(min(len(data), 200 if quick else 1000)))
        compared = dissect.compare_models(models, run.map_layers(), data)
        with artifacts.lock(out, "convscope demo"):
            paths = dissect.write_comparison(compared, len(data), Layout(out))
            record(Layout(out), "dissect", paths)
            return paths

    def ablation():
        result, _ = ablate_run(seeded(replace(PAIRS, n_train=200, n_val=100, n_test=100, epochs=1) if quick else PAIRS),
                            Layout(out).ablation, ABLATION_QUICK if quick else ABLATION)
        with artifacts.lock(out, "convscope demo"):
            return write_findings(Layout(out).findings, ablation_findings(result))

    main_run = [
        ("train zfnet_small", lambda: train(base, out)),
        ("scan and Fig. 2", analysis("scan", units=4 if quick else 0)),
        ("dissection (Bau et al.)", analysis("dissect", n=200 if quick else None)),
        ("evolution (Fig. 4)", analysis("evolution", units=4 if quick else 8, n_images=500 if quick else 2000)),
        ("feature visualisation (Olah et al.)",
         analysis("visualize", units=2 if quick else 8, steps=16 if quick else 256)),
        ("filters of the main run (Fig. 6)", analysis("filters")),
        ("occlusion (Fig. 7)", analysis("occlusion", n=n)),
        ("pointing game (TorchRay)", analysis("pointing", n=10 if quick else 100)),
        ("sanity check (Adebayo et al.)", analysis("sanity", n=2 if quick else 4)),
        ("invariance (Fig. 5)", lambda: (analysis("invariance", n=n)(), analysis("invariance", n=n, mode="render")())),
        ("correspondence (Table 1)", analysis("correspondence", draws=2 if quick else TABLE1_DRAWS)),
        ("probes (Table 7)", analysis("probe-layers", n_per_class=5 if quick else 30)),
    ]
    comparisons = [
        ("train alexnet_small (Fig. 6)", lambda: train(replace(compare, model="alexnet_small"),
                                                        out / "compare" / "alexnet_small")),
        ("train zfnet_small without renormalisation (Fig. 6)",
         lambda: train(replace(base, renorm=False), out / "compare" / "zfnet_small-norenorm", renorm_twin=out)),
        ("filters (Fig. 6)", analysis("filters")),  # again, beside the two runs just trained
        ("dissection compared: epochs, AlexNet, no renorm (Bau et al.)", dissections),
        ("train zfnet_small on parts that correspond (Table 1)",
         lambda: train(seeded(replace(QUICK, data="synthetic-parts") if quick else PARTS_RUN),
                       out / "compare" / "zfnet_small-parts")),
        ("correspondence on parts that correspond (Table 1)", table1_parts),
        ("transfer to digits (Tables 4-5, Fig. 9)",
         analysis("transfer", target="digits", shots=shots, folds=folds, scratch_steps=scratch_steps)),
        ("pretrain zfnet_small on six classes (transfer)",
         lambda: train(seeded(replace(QUICK, classes=SIX.classes) if quick else SIX),
                       out / "compare" / "zfnet_small-six")),
        ("transfer to held-out classes (Tables 4-5, Fig. 9)", heldout),
        ("ablation on pairs (Table 3)", ablation),
    ]
    # The main run's report first (about 3 of the demo's 12 to 15 minutes), saying what is still to come; the full
    # report when the comparisons are done.
    pending = [name for name, _ in comparisons]
    return [*main_run, (FIRST_REPORT, lambda: build_report(out, pending=pending)), *comparisons,
            ("report", lambda: build_report(out))]


def _done(out: Path) -> dict[str, float]:
    """The steps an earlier start of the demo in ``out`` finished (``timings.json``; nothing when it is damaged)."""
    timings = artifacts.read_json(Layout(out).timings)
    if not isinstance(timings, dict):
        return {}
    return {k: v for k, v in timings.items() if isinstance(v, int | float)}


def run_demo(out: str | Path, quick: bool = False, echo: Callable[[str], None] = print, seeds: int = 1) -> Path:
    """Run every step, write ``timings.json`` (step -> seconds), return the run directory (its ``report.html``
    is the page to open). Started again, it skips the analyses an earlier start finished. ``seeds`` > 1 runs the
    demo again at training seeds 1..seeds-1 (``seeds/seed-K``, after the main run's report is written) and
    writes the findings over all the seeds (``findings-seeds.json``), which the report then shows
    (:func:`findings_text` gives their table). Ends by printing the total time and the process's peak memory."""

    out = Path(out)
    check_int(seeds, "seeds", 1, 100)
    start = time.perf_counter()
    _run_steps(out, quick, 0, echo, start)
    if seeds > 1:

        folders = [out] + [Layout(out).seed_runs / f"seed-{k}" for k in range(1, seeds)]
        for k, folder in enumerate(folders[1:], start=1):
            echo(f"[demo] seed {k} of {seeds - 1} more, into {folder}")
            _run_steps(folder, quick, k, lambda line, k=k: echo(line.replace("[demo]", f"[demo seed {k}]")), start)
        with artifacts.lock(out, "convscope demo"):
            write_findings(Layout(out).seed_findings, combine([read_findings(Layout(f).findings) for f in folders]))
        build_report(out)
    total = time.perf_counter() - start
    echo(f"[demo] total: {total:.0f} s ({total / 60:.1f} min); peak memory {resident_memory()[1] / 2**30:.2f} GB")
    return out


def _run_steps(out: Path, quick: bool, seed: int, echo: Callable[[str], None], start: float) -> None:
    timings = _done(out)
    for name, step in steps(out, quick, seed):
        if name in timings and not name.startswith(AGAIN):
            echo(f"[demo] {name}: done before ({timings[name]:.0f} s); delete its line in {Layout(out).timings.name} "
                 "to redo it")
            continue
        echo(f"[demo] {name} ...")
        t0 = time.perf_counter()
        step()
        timings[name] = round(time.perf_counter() - t0, 2)
        now, peak = resident_memory()
        release_freed_memory()  # what the step freed goes back: the next step's peak is its own
        echo(f"[demo] {name}: {timings[name]:.0f} s (memory {now / 2**30:.2f} GB, peak so far {peak / 2**30:.2f})")
        if name == FIRST_REPORT:
            echo(f"[demo] the main run's report is ready after {time.perf_counter() - start:.0f} s: "
                 f"{Layout(out).report.resolve()} (written again with the comparisons when they are done)")
        artifacts.write_json(Layout(out).timings, timings)


def findings_text(out: Path) -> str:
    """The demo's findings table (over every seed where it measured several), with where it was read from."""

    path = Layout(out).shown_findings()
    findings = read_findings(path)
    return f"findings ({path}):\n{findings_table(findings)}" if findings else f"no findings in {path}"


