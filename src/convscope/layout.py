"""The run directory's layout: the one place that knows where every file of a run lives.

A run is a trained run (``config.json``, written by ``convscope train``) or an attached one (``attach.json``,
written by ``convscope attach`` for the user's own model). Both hold the analyses' files in the same places::

    config.json | attach.json     what the run is (training config, or model spec + weights + data)
    metrics.json  state.pt  model.safetensors  test.json  checkpoints/epoch_NNN.safetensors   (training)
    state.idle.pt                                         the state where renormalisation first acted
    scan/topk.safetensors  scan/state.pt  scan/drawn.json Fig. 2's data-set scan, its resume state, units drawn
    figures/<key>.png|json|txt                            one figure or table of the paper (fig5, fig7, table1)
    figures/<key>_<layer>.png                             one layer's panel (fig2_conv5, fig4_conv5)
    figures/units/<layer>/unit_NNNN.png                   one unit's top-k projections beside its patches
    figures/units/<layer>/<rule>/unit_NNNN.png            the same under another rule (guided, gradient)
    figures/units/<layer>/thumb/unit_NNNN.png             its thumbnail (strongest activation, projected)
    figures/evolution/<layer>/unit_NNNN.png               one unit's strongest activation at every epoch
    figures/visualize/<layer>/unit_NNNN.png  visualize.json   the image optimised to excite one unit; the numbers
    probes/  transfer/<target>/  ablation/  compare/<run>/
    manifest.json  timings.json  report.html          what each analysis wrote; the demo's timings; the report
    findings.json  findings-seeds.json  seeds/seed-K/  each claim's verdict; over seeds; the demo at other seeds

Nothing else in convscope spells a file name of a run: writers, the report and the viewer ask the layout.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG, ATTACH = "config.json", "attach.json"


def natural_key(text: str) -> list:
    """Sort key that puts conv2 before conv10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


class Layout:
    """Paths of one run directory (nothing is created or read here; see :mod:`convscope.artifacts` for writes)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Layout({str(self.root)!r})"

    # --- what the run is
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def attach(self) -> Path:
        return self.root / ATTACH

    def is_run(self) -> bool:
        return self.config.is_file() or self.attach.is_file()

    # --- training
    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def state(self) -> Path:
        return self.root / "state.pt"

    @property
    def idle_state(self) -> Path:
        """The training state at the last epoch before renormalisation first rescaled a filter: where the same
        run without renormalisation starts (:func:`convscope.train.train`'s ``renorm_twin``)."""
        return self.root / "state.idle.pt"

    @property
    def final(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def test(self) -> Path:
        return self.root / "test.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.safetensors"

    def saved_epochs(self) -> dict[int, Path]:
        """Epoch -> weights file of every epoch checkpoint the run saved."""
        out = {}
        for f in sorted(self.checkpoints.glob("epoch_*.safetensors")):
            try:
                out[int(f.stem.split("_")[1])] = f
            except ValueError:
                continue
        return out

    # --- analyses
    @property
    def scan(self) -> Path:
        return self.root / "scan"

    @property
    def topk(self) -> Path:
        return self.scan / "topk.safetensors"

    @property
    def scan_state(self) -> Path:
        return self.scan / "state.pt"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def figure(self, name: str, suffix: str = ".png") -> Path:
        """``figures/<name><suffix>``: one figure or table of the paper (``figure("fig7", ".json")``)."""
        return self.figures / f"{name}{suffix}"

    def layer_figure(self, name: str, layer: str) -> Path:
        """``figures/<name>_<layer>.png``: one layer's panel of a per-layer figure (Fig. 2, Fig. 4)."""
        return self.figures / f"{name}_{layer}.png"

    def layer_figures(self, name: str) -> dict[str, Path]:
        """layer -> panel of every layer that has one, layers in natural order."""
        prefix = f"{name}_"
        found = {p.stem[len(prefix):]: p for p in self.figures.glob(f"{prefix}*.png") if not p.name.startswith(".")}
        return {layer: found[layer] for layer in sorted(found, key=natural_key)}

    @property
    def units(self) -> Path:
        return self.figures / "units"

    @property
    def evolution(self) -> Path:
        return self.figures / "evolution"

    @property
    def drawn(self) -> Path:
        """Which units the scan has drawn so far, and for which scan: the drawing's resume state."""
        return self.scan / "drawn.json"

    def of_rank(self, path: Path, rank: int, world: int) -> Path:
        """A resume state's file for one process of a distributed job (``state.rank1of2.pt``); the file itself
        for a single process."""
        return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}of{world}{path.suffix}")

    def unit(self, layer: str, unit: int, rule: str | None = None) -> Path:
        """One unit's Fig. 2 projections under the scan's main rule, or under another ``rule`` (in a folder of its
        name). A scan before pictures were JPEG wrote ``.png`` tiles, projections and patches in one:
        :meth:`picture` finds either."""
        folder = self.units / layer if rule is None else self.units / layer / rule
        return folder / f"unit_{unit:04d}.jpg"

    def unit_patches(self, layer: str, unit: int) -> Path:
        """One unit's Fig. 2 image patches, the same under every rule."""
        return self.units / layer / "patches" / f"unit_{unit:04d}.jpg"

    def unit_thumb(self, layer: str, unit: int) -> Path:
        """One unit's thumbnail for its layer's page: its strongest activation, projected."""
        return self.units / layer / "thumb" / f"unit_{unit:04d}.jpg"

    @staticmethod
    def picture(path: Path) -> Path | None:
        """The picture at ``path``, or the PNG an older scan wrote there; None where there is neither."""
        return next((p for p in (path, path.with_suffix(".png")) if p.is_file()), None)

    def evolution_strip(self, layer: str, unit: int) -> Path:
        """One unit's Fig. 4 strip of epochs."""
        return self.evolution / layer / f"unit_{unit:04d}.png"

    @property
    def visualize(self) -> Path:
        return self.figures / "visualize"

    @property
    def dissected(self) -> Path:
        """The dissection's pictures of labelled units (``convscope dissect``, Bau et al. 2017)."""
        return self.figures / "dissect"

    def dissected_unit(self, layer: str, unit: int) -> Path:
        """A labelled unit's strongest images with its label's pixels and its own region outlined."""
        return self.dissected / layer / f"unit_{unit:04d}.png"

    def visualization(self, layer: str, unit: int) -> Path:
        """The image optimised to excite one unit (``convscope visualize``, Olah et al. 2017)."""
        return self.visualize / layer / f"unit_{unit:04d}.png"

    def visualizations(self) -> dict[str, dict[int, Path]]:
        """layer -> unit -> optimised image, of every unit visualised."""
        return self.unit_files(self.visualize)

    @property
    def visualize_numbers(self) -> Path:
        """Per layer: the units visualised, their activations in their images, the seed and the steps."""
        return self.visualize / "visualize.json"

    @staticmethod
    def unit_files(folder: Path) -> dict[str, dict[int, Path]]:
        """layer -> unit -> file, for ``folder/<layer>/unit_NNNN.png`` or ``.jpg`` (``units`` or ``evolution``;
        the JPEG where there are both), layers in natural order."""
        out: dict[str, dict[int, Path]] = {}
        if folder.is_dir():
            for layer_dir in folder.iterdir():
                if not layer_dir.is_dir():
                    continue
                for f in sorted(layer_dir.glob("unit_*.*"), key=lambda f: f.suffix == ".jpg"):  # a JPEG wins
                    if f.suffix not in (".png", ".jpg"):
                        continue
                    try:
                        out.setdefault(layer_dir.name, {})[int(f.stem.split("_", 1)[1])] = f
                    except ValueError:
                        continue
        return {layer: out[layer] for layer in sorted(out, key=natural_key)}

    @property
    def probes(self) -> Path:
        return self.root / "probes"

    def probe(self, suffix: str) -> Path:
        return self.probes / f"probes{suffix}"

    def transfer(self, target: str, suffix: str) -> Path:
        return self.root / "transfer" / target / f"transfer{suffix}"

    def transfers(self, suffix: str) -> list[Path]:
        """Every target's ``transfer<suffix>``, targets in natural order."""
        found = (self.root / "transfer").glob(f"*/transfer{suffix}")
        return sorted(found, key=lambda p: natural_key(p.as_posix()))

    @property
    def ablation(self) -> Path:
        return self.root / "ablation"

    def ablation_file(self, suffix: str) -> Path:
        return self.ablation_path(self.ablation, suffix)

    @staticmethod
    def ablation_path(folder: str | Path, suffix: str) -> Path:
        """``ablation<suffix>`` in a folder of Table 3's variant runs (a run's ``ablation/``, or ``ablate --out``)."""
        return Path(folder) / f"ablation{suffix}"

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    def compared_runs(self) -> list[Path]:
        """The runs under ``compare/`` (the demo's Fig. 6 comparisons), in name order."""
        if not self.compare.is_dir():
            return []
        return sorted(p for p in self.compare.iterdir() if Layout(p).is_run())

    # --- what was written, and the report
    @property
    def findings(self) -> Path:
        """Each claim the analyses tested, with its measured contrast and verdict (:mod:`convscope.findings`)."""
        return self.root / "findings.json"

    @property
    def seed_findings(self) -> Path:
        """The findings over every training seed of ``convscope demo --seeds N`` (this run's and ``seeds/``')."""
        return self.root / "findings-seeds.json"

    def shown_findings(self) -> Path:
        """The findings the report and the demo show: over every seed where the demo measured several."""
        return self.seed_findings if self.seed_findings.is_file() else self.findings

    @property
    def seed_runs(self) -> Path:
        """``convscope demo --seeds N``: the demo again at training seeds 1..N-1, one folder each (``seed-1``)."""
        return self.root / "seeds"

    @property
    def manifest(self) -> Path:
        """Every file each analysis wrote (``{key: [paths]}``), so that one deleted later shows as missing."""
        return self.root / "manifest.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def curve(self) -> Path:
        return self.figure("training_curve")

    @property
    def report(self) -> Path:
        return self.root / "report.html"


__all__ = ["Layout", "natural_key"]
