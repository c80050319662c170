"""The command line: parse, call the library, print. Bad input exits with status 2 and a message saying what to do."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import ConvscopeError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConvscopeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convscope")
def main() -> None:
    """convscope: see inside convolutional networks, after Zeiler & Fergus (ECCV 2014)."""


@main.command()
def models() -> None:
    """List the built-in models and their paper layer names."""
    from .models import create_model, list_models

    for name in list_models():
        model = create_model(name, num_classes=10)
        n = sum(p.numel() for p in model.parameters())
        layers = ", ".join(getattr(model, "paper_layers", {}))
        click.echo(f"{name:14s} {model.input_size:>4d} px  {n / 1e6:7.2f} M params (10 classes)  layers: {layers}")


@main.group()
def data() -> None:
    """Data sets: list them, preview the embedded one."""


@data.command("list")
def data_list() -> None:
    """List the data sets convscope reads."""
    from .data import list_datasets

    notes = {"synthetic": "embedded, generated (default; ground truth: boxes, masks, parts)",
             "pairs": "embedded, generated, 128 px: same or different colour of two far-apart discs (ablation)",
             "cifar10": "CIFAR-10 python batches (--data-root)", "digits": "scikit-learn's bundled digits",
             "folder": "an ImageFolder tree: root/class/image (--data-root)"}
    for name in list_datasets():
        click.echo(f"{name:10s} {notes[name]}")


@data.command("preview")
@click.option("--out", "out", type=click.Path(dir_okay=False), default="synthetic_preview.png", show_default=True,
              help="PNG file to write.")
@click.option("--n", default=16, show_default=True, help="How many samples.")
@click.option("--split", default="train", show_default=True, help="train, val or test.")
@click.option("--size", default=64, show_default=True, help="Image side in pixels (64 or 224).")
@click.option("--seed", default=0, show_default=True)
def data_preview(out: str, n: int, split: str, size: int, seed: int) -> None:
    """Write a grid of synthetic samples with their ground truth (box, parts, class) drawn on."""
    from . import artifacts
    from .data.synthetic import load_synthetic, preview

    data = load_synthetic(split, n=n, size=size, seed=seed)
    artifacts.save_image(out, preview(data, n=n))
    click.echo(f"wrote {out}")


def _train_options(f):
    options = [
        click.option("--model", default=None, help="Model name (see `convscope models`). [zfnet_small]"),
        click.option("--data", "data_name", default=None, help="Data set (see `convscope data list`). [synthetic]"),
        click.option("--data-root", default=None, type=click.Path(), help="Folder of cifar10 or folder data."),
        click.option("--epochs", type=int, default=None, help="Epochs to train. [30]"),
        click.option("--batch-size", type=int, default=None, help="Batch size. [128]"),
        click.option("--lr", type=float, default=None, help="Initial learning rate. [0.01]"),
        click.option("--seed", type=int, default=None, help="Seed for every random choice. [0]"),
        click.option("--n-train", type=int, default=None, help="Use at most this many training images."),
        click.option("--image-size", type=int, default=None, help="Image side in pixels."),
        click.option("--renorm/--no-renorm", default=None,
                     help="Renormalise conv filters to RMS 0.1 (paper; off for Fig. 6a). [on]"),
        click.option("--config", "config_file", type=click.Path(), default=None,
                     help="TOML or JSON file of settings; options given here override it."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _resolve(config_file, data_name, **kw):
    from .config import resolve

    return resolve(config_file, data=data_name, **kw)


@main.command()
@_train_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run directory: created, or resumed when it holds this same run.")
def train(out: str, **kw) -> None:
    """Train a model with the paper's recipe (SGD, momentum 0.9, dropout, filter renormalisation).

    Weights are saved at epochs 1, 2, 5, 10, 20, 30, 40, 64 and at the end; rerun the same command to resume."""
    from .train import run_summary
    from .train import train as run_train

    cfg = _resolve(**kw)
    result = run_train(cfg, out)
    click.echo(f"{cfg.model} on {cfg.data}: {run_summary(result.metrics, result.test)}")
    click.echo(f"run directory: {Path(out).resolve()}")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run directory (an interrupted demo resumes).")
@click.option("--quick", is_flag=True, help="A small smoke run (a minute or two): fewer images and epochs.")
def demo(out: str, quick: bool) -> None:
    """The whole paper on the embedded data: train zfnet_small with the paper's recipe, run every analysis,
    write the run directory."""
    from .demo import run_demo

    path = run_demo(out, quick=quick, echo=click.echo)
    click.echo(f"run directory: {path.resolve()}")
    click.echo(f"report: {(path / 'report.html').resolve()}   viewer: convscope serve {out}")


def _layers(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


_run_arg = click.argument("run", type=click.Path(file_okay=False))
_layers_opt = click.option("--layers", default=None,
                           help="Comma-separated layer names (paper names or module names). [conv1..conv5]")
_rule_opt = click.option("--rule", default="deconvnet", show_default=True,
                         help="Projection rule: deconvnet (the paper), guided, gradient.")


@main.command()
@_run_arg
@_layers_opt
@click.option("--k", default=9, show_default=True, help="Strongest activations kept per feature map.")
@click.option("--split", default="val", show_default=True, help="Data split to scan (train, val, test).")
@click.option("--units", default=16, show_default=True, help="Units per layer to draw (a seeded subset); 0 = all.")
@click.option("--seed", default=0, show_default=True, help="Seed of the unit subset.")
@_rule_opt
def scan(run: str, layers: str | None, k: int, split: str, units: int, seed: int, rule: str) -> None:
    """Fig. 2: the top-k activations of every feature map over a data split, projected beside their patches.

    Resumes an interrupted scan. Writes RUN/scan/topk.safetensors and RUN/figures/fig2_<layer>.png."""
    from .runs import open_run, scan_run

    paths = scan_run(open_run(run), _layers(layers), k=k, split=split, units=units or None, seed=seed, rule=rule)
    click.echo(f"wrote {len(paths)} files; layer grids: " + ", ".join(str(p) for p in paths if "fig2_" in p.name))


@main.command()
@_run_arg
@_layers_opt
@click.option("--units", default=8, show_default=True, help="Units per layer (a seeded subset).")
@click.option("--n-images", default=2000, show_default=True, help="Training images searched at each epoch.")
@click.option("--seed", default=0, show_default=True)
@_rule_opt
def evolution(run: str, layers: str | None, units: int, n_images: int, seed: int, rule: str) -> None:
    """Fig. 4: each unit's strongest activation at every saved epoch, projected (units down, epochs across)."""
    from .runs import evolution_run, open_run

    paths = evolution_run(open_run(run), _layers(layers), units=units, n_images=n_images, seed=seed, rule=rule)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


_split_opt = click.option("--split", default="test", show_default=True, help="Data split (train, val, test).")
_n_opt = click.option("--n", "n", default=5, show_default=True, help="How many images (the first of the split).")


@main.command()
@_run_arg
@_n_opt
@_split_opt
@click.option("--layer", default="conv5", show_default=True, help="Layer whose strongest map is tracked (b, c).")
@click.option("--size", type=int, default=None, help="Side of the grey square in pixels. [3/16 of the image]")
@click.option("--stride", type=int, default=None, help="Step between squares in pixels. [1/16 of the image]")
@click.option("--batch-size", default=64, show_default=True, help="Occluded images per forward pass.")
def occlusion(run: str, n: int, split: str, layer: str, size: int | None, stride: int | None,
              batch_size: int) -> None:
    """Fig. 7: slide a grey square over each image; per position the layer's strongest map's total activation,
    its projection, p(correct class) and the most probable class. Writes RUN/figures/fig7.png and .json."""
    from .runs import occlusion_run, open_run

    paths = occlusion_run(open_run(run), n=n, split=split, layer=layer, size=size, stride=stride,
                          batch_size=batch_size)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@main.command()
@_run_arg
@_n_opt
@_split_opt
@click.option("--mode", default="warp", show_default=True,
              help="warp: translate, scale and rotate the image (the paper); render: re-render the embedded "
                   "data's object with the pose changed (no border artefacts).")
def invariance(run: str, n: int, split: str, mode: str) -> None:
    """Fig. 5: distance of layer 1 and layer 7 features from the original under vertical translation, scale and
    rotation, and p(true class). Writes RUN/figures/fig5.png (fig5_render.png) and .json."""
    from .runs import invariance_run, open_run

    paths = invariance_run(open_run(run), n=n, split=split, mode=mode)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@main.command()
@_run_arg
@click.option("--class", "class_name", default="face", show_default=True, help="Class of the embedded data.")
@click.option("--parts", default=None, help="Comma-separated part names. [left_eye,right_eye,nose]")
@_split_opt
@click.option("--draws", default=10, show_default=True, help="Random draws of images and regions.")
@click.option("--size", type=int, default=None, help="Side of the masking square. [1/8 of the image]")
@click.option("--seed", default=0, show_default=True)
@click.option("--parts-json", type=click.Path(dir_okay=False), default=None,
              help='Your own images and parts: {"images": ["a.png", ...], "parts": {"left_eye": [[x, y], ...]}}.')
def correspondence(run: str, class_name: str, parts: str | None, split: str, draws: int, size: int | None,
                   seed: int, parts_json: str | None) -> None:
    """Table 1: how consistently masking the same part changes the features of 5 images (Delta at conv5 and
    fc7), against random regions. Writes RUN/figures/table1.json and .txt."""
    from .runs import correspondence_run, open_run

    paths = correspondence_run(open_run(run), class_name=class_name, parts=_layers(parts), split=split, draws=draws,
                               seed=seed, size=size, parts_json=parts_json)
    click.echo("wrote " + ", ".join(str(p) for p in paths))
    click.echo(paths[-1].read_text())


@main.command()
@_run_arg
@click.option("--compare", "others", multiple=True, type=click.Path(file_okay=False),
              help="Another run to set beside this one (repeatable); the demo's RUN/compare/ runs come by default.")
@click.option("--n-images", default=16, show_default=True, help="Validation images for the layer-2 projections.")
def filters(run: str, others: tuple[str, ...], n_images: int) -> None:
    """Fig. 6: conv1 filters as image grids, and per run the dead-filter fraction, low/mid/high frequency
    energy, dominance (max/median filter RMS) and aliasing of layer-2 projections. Writes RUN/figures/fig6.*"""
    from .runs import filters_run, open_run

    paths = filters_run(open_run(run), others, n_images=n_images)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@main.command()
@_run_arg
def report(run: str) -> None:
    """Write RUN/report.html: every figure and table of the paper the run has, beside the paper's numbers, with
    the config, the model and the timings. Opens from file:// with no server; says what is missing."""
    from .report import build_report

    click.echo(f"wrote {build_report(run)}")


@main.command()
@_run_arg
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep it local).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
def serve(run: str, host: str, port: int) -> None:
    """Browse every layer and unit of RUN in a local web viewer: /layer/conv5/unit/42; arrow keys move between
    units, [ and ] (or up/down) between layers, ? shows the keys."""
    from .viewer import serve as run_viewer

    click.echo(f"serving {run} at http://{host}:{port}/ (Ctrl-C to stop)")
    run_viewer(run, host=host, port=port)


@main.command()
@_train_options
@click.option("--variants", default=None,
              help="Comma-separated Table 3 variants (full, no_conv34, no_fc7, no_fc67, no_conv34_fc67, fc_half, "
                   "fc_double, wide_conv345, wide_conv345_fc_double). [all]")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder of the variant runs (each resumable; a finished one is not retrained).")
def ablate(out: str, variants: str | None, **kw) -> None:
    """Table 3: train the variants of a model (layers removed or resized) with the same data, budget and seed,
    and write a table of train and validation errors beside the paper's."""
    from .ablation import ablate_run, ablation_table

    result, paths = ablate_run(_resolve(**kw), out, _layers(variants))
    click.echo(ablation_table(result))
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@main.command("probe-layers")
@_run_arg
@_layers_opt
@click.option("--target", default="run", show_default=True,
              help="Target set: run (its own splits), heldout, digits, folder (with --data-root).")
@click.option("--data-root", default=None, type=click.Path(), help="ImageFolder tree for --target folder.")
@click.option("--n-per-class", default=30, show_default=True, help="Training examples per class.")
@click.option("--pool", default="max", show_default=True, help="Pooling of conv maps to a fixed grid: max or avg.")
@click.option("--grid", default=2, show_default=True, help="Side of that grid.")
@click.option("--seed", default=0, show_default=True)
def probe_layers(run: str, layers: str | None, target: str, data_root: str | None, n_per_class: int, pool: str,
                 grid: int, seed: int) -> None:
    """Table 7: a linear SVM and a softmax on the features of each layer (conv1..conv5, fc6, fc7); mean
    per-class accuracy per layer. Writes RUN/probes/."""
    from .probes import probe_run, probe_table

    result, paths = probe_run(run, _layers(layers), n_per_class=n_per_class, target=target, data_root=data_root,
                              seed=seed, pool=pool, grid=grid)
    click.echo(probe_table(result))
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@main.command()
@_run_arg
@click.option("--target", default="heldout", show_default=True,
              help="heldout (synthetic classes the run did not see), digits, folder (with --data-root).")
@click.option("--data-root", default=None, type=click.Path(), help="ImageFolder tree (Caltech-101/256).")
@click.option("--shots", default="1,2,5,10,15,30", show_default=True, help="Training images per class.")
@click.option("--folds", default=5, show_default=True, help="Seeded folds per number of shots.")
@click.option("--features", default="fc7,all", show_default=True,
              help="Frozen feature sets, comma-separated, each scored: a layer (fc7: the paper's) or all "
                   "(conv1..fc7 joined).")
@click.option("--scratch/--no-scratch", default=True, help="Also train the same net from scratch. [on]")
@click.option("--scratch-steps", default=300, show_default=True, help="SGD steps of each from-scratch net.")
@click.option("--seed", default=0, show_default=True)
def transfer(run: str, target: str, data_root: str | None, shots: str, folds: int, features: str, scratch: bool,
             scratch_steps: int, seed: int) -> None:
    """Tables 4-5, Fig. 9: the run's layers 1-7 frozen and a new softmax trained on n images per class of a
    target set, against the same net trained from scratch; mean per-class accuracy +- spread over folds."""
    from .transfer import transfer_run, transfer_table

    try:
        shot_list = [int(s) for s in shots.split(",") if s.strip()]
    except ValueError as e:
        raise ConvscopeError(f"--shots must be comma-separated integers, got {shots!r}") from e
    feature_list = [f.strip() for f in features.split(",") if f.strip()]
    result, paths = transfer_run(run, target=target, data_root=data_root, shots=shot_list, folds=folds, seed=seed,
                                 features=feature_list, scratch=scratch, scratch_steps=scratch_steps)
    click.echo(transfer_table(result))
    click.echo("wrote " + ", ".join(str(p) for p in paths))
