"""The registry of analyses: each figure and table of the paper that convscope makes, registered once.

An :class:`Analysis` names its command (``convscope <name> RUN``), the paper's figure or table, a pure
``compute(run, **options) -> result`` and a ``write(result, layout) -> paths``. The command line's analysis
commands are generated from it (each keyword of ``compute`` becomes an option, its default the option's
default), the report's sections and the viewer's figure pages read it, and one parametrized test runs them
all. Table 3 (ablation) trains models rather than reading a run, so it has its own command and only its files
are registered here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import (
    artifacts,
    correspondence,
    distributed,
    evolution,
    filters,
    invariance,
    occlusion,
    pointing,
    probes,
    sanity,
    transfer,
    units,
    visualize,
)
from .errors import unknown
from .layout import Layout


@dataclass(frozen=True)
class Analysis:
    """One analysis: its command, the paper's reference, how it computes and writes, and which files show it.

    ``files(layout)`` gives the images and text tables the report and the viewer show; ``help`` the command's
    option texts (one per keyword of ``compute``); ``flags`` an option's flag where it is not the keyword's name;
    ``summary(result)`` the text the command prints after writing; ``make`` the command that makes the files
    (``{run}``: the run directory), listed where they are missing."""

    name: str
    key: str
    ref: str
    title: str
    caption: str
    files: Callable[[Layout], tuple[list[Path], list[Path]]]
    compute: Callable[..., Any] | None = None
    write: Callable[[Any, Layout], list[Path]] | None = None
    help: Mapping[str, str] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)
    summary: Callable[[Any], str] | None = None
    make: str = ""
    per_layer: bool = False  # Fig. 2 and 4: one panel per layer, and a page per unit in the viewer
    projects: bool = False  # its pictures are projections (what --nonlinearities gradient changes)
    distributed: bool = False  # its work is split across the processes of torchrun (else rank 0 does it all)
    findings: Callable[[Any], list] | None = None  # the claims its result tests (convscope.findings.Finding)

    @property
    def command(self) -> str:
        """The command that makes this analysis's files (``{run}`` stands for the run directory)."""
        return self.make or f"convscope {self.name} {{run}}"

    def options(self) -> list[inspect.Parameter]:
        """The keywords of ``compute`` a user sets: every parameter but the run and the progress switch."""
        if self.compute is None:
            return []
        params = list(inspect.signature(self.compute).parameters.values())[1:]
        return [p for p in params if p.name != "progress"]

    def run(self, run, **options) -> tuple[Any, list[Path]]:
        """Compute over ``run`` and write into its directory (holding its lock: one writer at a time); the result
        and the files written. Under torchrun, rank 0 holds the lock; a distributed analysis splits its work
        across the ranks, another runs on rank 0 alone (the other ranks return (None, []))."""
        group = distributed.init()
        with distributed.locked(run.path, f"convscope {self.name}", group):
            if not (self.distributed or group.main):
                return None, []
            result = self.compute(run, **options)
            paths = self.write(result, run.layout)
            if group.main and self.findings is not None:
                from .findings import write_findings

                paths.append(write_findings(run.layout.findings, self.findings(result)))
            if group.main:
                record(run.layout, self.key, paths)
            return result, paths


def record(layout: Layout, key: str, paths: list[Path]) -> None:
    """Add ``paths`` to what the manifest says analysis ``key`` wrote (a file deleted later then shows as missing
    in the report and the viewer, rather than silently absent)."""
    manifest = written(layout)
    manifest[key] = sorted(set(manifest.get(key, [])) | {p.relative_to(layout.root).as_posix() for p in paths})
    artifacts.write_json(layout.manifest, manifest)


def written(layout: Layout) -> dict[str, list[str]]:
    """The manifest: analysis key -> the files it wrote (relative paths); empty when missing or damaged."""
    import json

    try:
        manifest = json.loads(layout.manifest.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(manifest, dict):
        return {}
    return {k: [p for p in v if isinstance(p, str)] for k, v in manifest.items() if isinstance(v, list)}


def _existing(*paths: Path) -> list[Path]:
    return [p for p in paths if p.is_file()]


def _figure(key: str, *variants: str) -> Callable[[Layout], tuple[list[Path], list[Path]]]:
    return lambda layout: (_existing(*(layout.figure(key + v) for v in variants or ("",))), [])


_LAYERS = "Comma-separated layers (paper names, module names, name#k for a module's k-th call)."
_SPLIT = "Data split: train, val, test, or all. [val / test on a trained run; all on an attached one]"
_RULE = "Projection rule: deconvnet (the paper), guided, gradient."

REGISTRY: list[Analysis] = [
    Analysis(
        "scan", "fig2", "Fig. 2", "Feature visualisation",
        "Per layer, a subset of feature maps; per map its top-9 activations over the validation set, each "
        "projected to pixels by the deconvnet (left 3x3), beside the image patches under them (right 3x3).",
        files=lambda layout: (list(layout.layer_figures("fig2").values()), []),
        compute=units.compute, write=units.write_scan, per_layer=True, projects=True, distributed=True,
        findings=units.findings,
        help={"layers": _LAYERS + " [conv1..conv5, or the model's stages]",
              "k": "Strongest activations kept per feature map.", "split": _SPLIT.replace("val / test", "val"),
              "units": "Units per layer to draw (a seeded subset); 0 = all.", "seed": "Seed of the unit subset.",
              "batch_size": "Images per forward pass of the scan (lower it where memory is short; the result is "
                            "the same).",
              "class_k": "Strongest images kept per map and class (zennit-crp's per-class statistics); a unit's "
                         "class histogram counts the classes of its class-k strongest images. 0 = none.",
              "rule": _RULE + " Several, comma-separated (deconvnet,guided,gradient), draw each unit under "
                              "each; the viewer switches between them."},
        summary=units.summary),
    Analysis(
        "evolution", "fig4", "Fig. 4", "Evolution of features during training",
        "Per layer, a few maps (rows) at the saved epochs (columns): the strongest activation over training "
        "images, projected. Lower layers settle in a few epochs, upper layers much later.",
        files=lambda layout: (list(layout.layer_figures("fig4").values()), []),
        compute=evolution.compute, write=evolution.write_evolution, per_layer=True, projects=True,
        help={"layers": _LAYERS + " [conv1..conv5, or the model's stages]",
              "units": "Units per layer (a seeded subset).", "n_images": "Training images searched at each epoch.",
              "seed": "Seed of the units and images.", "rule": _RULE,
              "checkpoints": "A folder of state dicts, one per epoch, the epoch a number in each file name "
                             "(epoch_5.pth, 10.safetensors). [the run's own epoch checkpoints]"}),
    Analysis(
        "invariance", "fig5", "Fig. 5", "Invariance to translation, scale and rotation",
        "Distance between the feature vectors of original and transformed images at layer 1 and layer 7, and "
        "the probability of the true label, as the image is translated, scaled and rotated.",
        files=_figure("fig5", "", "_render"), compute=invariance.compute, findings=invariance.findings,
        write=lambda result, layout: invariance.write_invariance(result, layout, "fig5"),
        help={"n": "How many images (the first of the split).", "split": _SPLIT,
              "mode": "warp: translate, scale and rotate the image (the paper); render: re-render the embedded "
                      "data's object with the pose changed (no border artefacts)."}),
    Analysis(
        "filters", "fig6", "Fig. 6", "Architecture diagnosis of layers 1 and 2",
        "Layer-1 filters with and without filter renormalisation, and with a large (11x11, stride 4) vs the "
        "paper's smaller (7x7, stride 2) first layer.",
        files=_figure("fig6"), compute=filters.compute, projects=True, findings=filters.findings,
        write=lambda result, layout: filters.write_filters(result, layout, "fig6"),
        help={"others": "Another run to set beside this one (repeatable); the demo's RUN/compare/ runs come "
                        "by default.",
              "n_images": "Images for the layer-2 projections."},
        flags={"others": "--compare"}),
    Analysis(
        "occlusion", "fig7", "Fig. 7", "Occlusion sensitivity",
        "A grey square slid over the image: (b) total activation of the strongest layer-5 map, (c) its "
        "projection, (d) probability of the correct class, (e) most probable class, per occluder position.",
        files=_figure("fig7"), compute=occlusion.compute, projects=True, findings=occlusion.findings,
        write=lambda result, layout: occlusion.write_occlusion(result, layout, "fig7"),
        help={"n": "How many images (the first of the split).", "split": _SPLIT,
              "layer": "Layer whose strongest map is tracked (b, c). [conv5, or the model's last stage]",
              "size": "Side of the grey square in pixels. [3/16 of the image]",
              "stride": "Step between squares in pixels. [1/16 of the image]",
              "batch_size": "Occluded images per forward pass.",
              "method": "auto (incremental where it is exact on the model, else dense), incremental (Krypton: "
                        "each layer recomputed only where the square reaches) or dense (a full pass per "
                        "position). The same numbers to float rounding.",
              "approx": "Truncate the incremental change to a fraction of each map (Krypton's projective-field "
                        "threshold): faster, approximate."}),
    Analysis(
        "correspondence", "table1", "Table 1", "Correspondence of object parts",
        "The same part masked in 5 images of one class, or random regions: Delta, the mean sign change of the "
        "feature differences over image pairs. Lower than random means the parts are encoded consistently.",
        files=lambda layout: ([], _existing(layout.figure("table1", ".txt"), layout.figure("table1_parts", ".txt"))),
        compute=correspondence.compute, findings=correspondence.findings,
        write=lambda result, layout: correspondence.write_correspondence(result, layout, "table1"),
        help={"class_name": "Class of the embedded data.", "parts": "Comma-separated part names. "
              "[left_eye,right_eye,nose]", "split": _SPLIT, "draws": "Random draws of images and regions.",
              "size": "Side of the masking square. [1/8 of the image]", "seed": "Seed of the draws.",
              "parts_json": 'Your own images and parts: {"images": ["a.png", ...], "parts": {"left_eye": '
                            '[[x, y], ...]}}.'},
        flags={"class_name": "--class"}, summary=correspondence.format_table),
    Analysis(
        "ablate", "table3", "Table 3", "Ablation of the architecture",
        "The model retrained with layers removed or resized, same data, budget and seed (errors in %), here on "
        "the embedded pairs set: two discs far apart, of one colour or not, a task that needs a layer seeing "
        "both. The paper finds that depth matters: removing layers 3,4 and 6,7 together costs far more than "
        "either alone (71.3 % against 45.4 and 44.8 on ImageNet). On pairs the net without both is left at "
        "chance (50 %) while either removal alone costs nothing; on the twelve-class synthetic set, whose "
        "classes need no such depth, the contrast does not appear.",
        files=lambda layout: (_existing(layout.ablation_file(".png")), _existing(layout.ablation_file(".md"))),
        make="convscope ablate --config pairs --out {run}/ablation"),
    Analysis(
        "transfer", "transfer", "Tables 4-5, Fig. 9", "Transfer to small data sets",
        "Layers 1-7 kept fixed and a new softmax trained on n examples per class, on fc7 as in the paper and "
        "on conv1..fc7 joined, against the same net trained from scratch on those examples (mean per-class "
        "accuracy over folds).",
        files=lambda layout: (layout.transfers(".png"), layout.transfers(".md")), compute=transfer.compute,
        write=transfer.write_transfer, findings=transfer.findings,
        help={"target": "heldout (synthetic classes the run did not see), digits, folder (with --data-root), "
                        "run (the run's own splits).",
              "data_root": "ImageFolder tree for --target folder (Caltech-101/256).",
              "shots": "Training images per class.", "folds": "Seeded folds per number of shots.",
              "features": "Frozen feature sets, comma-separated, each scored: a layer (fc7: the paper's) or all "
                          "(every probed layer joined). [fc7,all; on other models the penultimate module and all]",
              "scratch": "Also train the same net from scratch.",
              "scratch_steps": "SGD steps of each from-scratch net.", "seed": "Seed of the folds and nets."},
        summary=transfer.transfer_table),
    Analysis(
        "probe-layers", "table7", "Table 7", "Discriminative power of each layer",
        "A linear SVM and a softmax on the features of one layer at a time: accuracy rises with depth.",
        files=lambda layout: (_existing(layout.probe(".png")), _existing(layout.probe(".md"))),
        compute=probes.compute, write=probes.write_probes, findings=probes.findings,
        help={"layers": _LAYERS + " [conv1..fc7, or the model's stages and penultimate module]",
              "target": "Target set: run (its own splits), heldout, digits, folder (with --data-root).",
              "data_root": "ImageFolder tree for --target folder.", "n_per_class": "Training examples per class.",
              "pool": "Pooling of conv maps to a fixed grid: max or avg.", "grid": "Side of that grid.",
              "seed": "Seed of the examples drawn."},
        summary=probes.probe_table),
    Analysis(
        "pointing", "pointing", "TorchRay's pointing game", "Does a class's map point at its object?",
        "Not in the paper: for each image and its class (true, and predicted), the maximum of each method's map "
        "(deconvnet, guided, gradient: TorchRay's protocol; occlusion; the image centre as the baseline) is a hit "
        "when it lies within 15 px at 224 of the object. Mean accuracy over classes, on all images and on the "
        "difficult ones (small, off-centre objects), beside TorchRay's VGG-16 on VOC07, where the deconvnet is "
        "below the centre baseline.",
        files=lambda layout: ([], _existing(layout.figure("pointing", ".md"))), compute=pointing.compute,
        write=pointing.write_pointing, projects=True, findings=pointing.findings,
        help={"n": "How many images (the first of the split).", "split": _SPLIT,
              "masks": "A folder of object masks for your own images: <class>/<image name>.png, white on the "
                       "object. [the embedded data's own masks]",
              "batch_size": "Images per forward and backward pass."},
        summary=pointing.pointing_table),
    Analysis(
        "sanity", "sanity", "Adebayo et al. 2018", "Sanity check: the maps when the weights are randomised",
        "Not in the paper: the model's modules re-initialised from the top down, one more at a time (Quantus's "
        "MPRT), and each method's map of the same images compared with the trained model's (Spearman rank "
        "correlation of the absolute maps). A map that barely changes shows the image or the architecture, not "
        "what the network learnt: the deconvnet's critique (Adebayo et al. 2018, Nie et al. 2018), measured on "
        "this model.",
        files=lambda layout: (_existing(layout.figure("sanity")), _existing(layout.figure("sanity", ".md"))),
        compute=sanity.compute, write=sanity.write_sanity, projects=True, findings=sanity.findings,
        help={"n": "How many images (the first of the split).", "split": _SPLIT,
              "order": "top_down: cascading, the layers above stay randomised (Adebayo's cascade); independent: "
                       "one layer at a time.",
              "seed": "Seed of the re-initialisation (Quantus's: torch seeded at seed + 1 per layer)."},
        summary=sanity.sanity_table),
    Analysis(
        "visualize", "visualize", "Olah et al. 2017", "Images optimised to excite each unit",
        "Not in the paper: per unit, the image optimised to excite it most (Adam on a decorrelated Fourier "
        "parameterisation, jittered, scaled and rotated at every step, as Lucid does). Fig. 2 shows what excites "
        "a unit among the data's images; this asks the model itself.",
        files=lambda layout: (list(layout.layer_figures("visualize").values()), []), compute=visualize.compute,
        write=visualize.write_visualize,
        help={"layers": _LAYERS + " [conv1..conv5, or the model's stages]",
              "units": "Units per layer to visualise (a seeded subset); 0 = all.",
              "objective": "neuron: the unit at the centre of its map (compares with its strongest activation "
                           "in the data); channel: its mean over the map (a texture).",
              "steps": "Optimisation steps (Adam, lr 0.05), all of a layer's units in one batch.",
              "seed": "Seed of the unit subset, the starting images and the random transforms."},
        summary=visualize.summary),
]


def get(name: str) -> Analysis:
    """The analysis registered under a command name or a paper key (``occlusion`` or ``fig7``)."""
    for a in REGISTRY:
        if name in (a.name, a.key):
            return a
    raise unknown("analysis", name, [a.name for a in REGISTRY])


__all__ = ["REGISTRY", "Analysis", "get", "record", "written"]
