"""The command line: parse, call the library, print. Bad input exits with status 2 and a message saying what to do."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from . import __version__, artifacts, distributed
from .ablation import ablate_run, ablation_table
from .analyses import REGISTRY
from .config import resolve as resolve_config
from .cpu import keep_freed_memory
from .data import list_datasets
from .data.folder import read_image
from .data.synthetic import load_synthetic, preview
from .deconvnet import nonlinearities_note
from .demo import findings_text, run_demo
from .errors import ConvscopeError, check_int, printable
from .findings import combine, findings_table, read_findings, write_findings
from .layers import paper_names
from .layout import Layout
from .models import create_model, list_models
from .receptive_field import layer_table
from .report import build_report, require_run
from .run import attach as attach_run
from .run import open_run
from .sheets import project_images, write_sheet
from .train import run_summary
from .train import train as run_train
from .usermodel import build_model, parse_model_args
from .viewer import serve as run_viewer


class _Path(click.Path):
    """click's Path, with a path the OS cannot take (a NUL byte, say) a usage error rather than a traceback."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except ValueError as e:
            self.fail(f"{value!r} is not a usable path ({e})", param, ctx)


class _Group(click.Group):
    """The commands written here, and one per analysis of the registry, made when it is asked for: an analysis
    registered after this module was imported has its command too."""

    def list_commands(self, ctx: click.Context) -> list[str]:

        return sorted({*super().list_commands(ctx), *(a.name for a in REGISTRY if a.compute is not None)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:

        command = super().get_command(ctx, name)
        if command is None:
            analysis = next((a for a in REGISTRY if a.name == name and a.compute is not None), None)
            command = _analysis_command(analysis) if analysis is not None else None
        return command

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            try:
                return super().invoke(ctx)
            except ConvscopeError as e:
                click.echo(f"error: {printable(e)}", err=True)
                sys.exit(2)
            finally:  # each note once, however many times a step said it (a file read for every split)
                for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
                    click.echo(f"note: {printable(message)}", err=True)



@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convscope")
def main() -> None:
    """convscope: see inside convolutional networks, after Zeiler & Fergus (ECCV 2014)."""

    keep_freed_memory()  # freed tensors reused, not handed back to the kernel (benchmarks/cpu.py)


@main.command()
def models() -> None:
    """List the built-in models and their paper layer names."""

    for name in list_models():
        model = create_model(name, num_classes=10)
        n = sum(p.numel() for p in model.parameters())
        layers = ", ".join(paper_names(model))
        click.echo(f"{name:14s} {model.input_size:>4d} px  {n / 1e6:7.2f} M params (10 classes)  layers: {layers}")


@main.group()
def data() -> None:
    """Data sets: list them, preview the embedded one."""


@data.command("list")
def data_list() -> None:
    """List the data sets convscope reads."""

    notes = {"synthetic": "embedded, generated (default; ground truth: boxes, masks, parts)",
             "synthetic-parts": "the same scenes, every eye and nose in one colour of its own (Table 1)",
             "pairs": "embedded, generated, 128 px: same or different colour of two far-apart discs (ablation)",
             "cifar10": "CIFAR-10 python batches (--data-root)", "digits": "scikit-learn's bundled digits",
             "folder": "an ImageFolder tree: root/class/image (--data-root)"}
    for name in list_datasets():
        click.echo(f"{name:10s} {notes[name]}")


@data.command("preview")
@click.option("--out", "out", type=_Path(dir_okay=False), default="synthetic_preview.png", show_default=True,
              help="PNG file to write.")
@click.option("--n", default=16, show_default=True, help="How many samples.")
@click.option("--split", default="train", show_default=True, help="train, val or test.")
@click.option("--size", default=64, show_default=True, help="Image side in pixels (64 or 224).")
@click.option("--seed", default=0, show_default=True)
def data_preview(out: str, n: int, split: str, size: int, seed: int) -> None:
    """Write a grid of synthetic samples with their ground truth (box, parts, class) drawn on."""

    data = load_synthetic(split, n=n, size=size, seed=seed)
    artifacts.save_image(out, preview(data, n=n))
    click.echo(f"wrote {out}")


def _compute_options() -> list[click.Option]:
    """Where a command computes: the device, and the processes that decode images."""
    return [click.Option(["--device"], default=None, help="Where the model computes: cpu, cuda (under torchrun "
                         "each rank's own GPU), cuda:N, mps, auto. [cpu; train: auto]"),
            click.Option(["--workers"], type=click.IntRange(0, 1024), default=0, show_default=True,
                         help="Processes that decode the images of an ImageFolder (DataLoader workers); the "
                              "result is the same.")]


def _train_options(f):
    options = [
        click.option("--model", default=None, help="Model name (see `convscope models`). [zfnet_small]"),
        click.option("--data", "data_name", default=None, help="Data set (see `convscope data list`). [synthetic]"),
        click.option("--data-root", default=None, type=_Path(), help="Folder of cifar10 or folder data."),
        click.option("--epochs", type=int, default=None, help="Epochs to train. [30]"),
        click.option("--batch-size", type=int, default=None, help="Batch size. [128]"),
        click.option("--lr", type=float, default=None, help="Initial learning rate. [0.01]"),
        click.option("--seed", type=int, default=None, help="Seed for every random choice. [0]"),
        click.option("--n-train", type=int, default=None, help="Use at most this many training images."),
        click.option("--image-size", type=int, default=None, help="Image side in pixels."),
        click.option("--renorm/--no-renorm", default=None,
                     help="Renormalise conv filters to RMS 0.1 (paper; off for Fig. 6a). [on]"),
        click.option("--config", "config_file", type=_Path(), default=None,
                     help="TOML or JSON file of settings; options given here override it."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _resolve(config_file, data_name, **kw):

    return resolve_config(config_file, data=data_name, **kw)


@main.command(params=_compute_options())
@_train_options
@click.option("--out", required=True, type=_Path(file_okay=False),
              help="Run directory: created, or resumed when it holds this same run.")
def train(out: str, device: str | None, workers: int, **kw) -> None:
    """Train a model with the paper's recipe (SGD, momentum 0.9, dropout, filter renormalisation).

    Weights are saved at epochs 1, 2, 5, 10, 20, 30, 40, 64 and at the end; rerun the same command to resume."""

    cfg = _resolve(**kw)
    result = run_train(cfg, out, device=device, workers=workers)

    if distributed.init().main:  # under torchrun, rank 0 speaks for the job
        click.echo(f"{cfg.model} on {cfg.data}: {run_summary(result.metrics, result.test)}")
        click.echo(f"run directory: {Path(out).resolve()}")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=_Path(file_okay=False),
              help="Run directory (an interrupted demo resumes).")
@click.option("--quick", is_flag=True, help="A small smoke run (a minute or two): fewer images and epochs.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1, 100),
              help="Training seeds: the demo again at seeds 1..N-1 (into OUT/seeds/seed-K), and each claim's "
                   "verdict over all N (it holds when it holds at every seed). Each seed takes as long as the demo.")
def demo(out: str, quick: bool, seeds: int) -> None:
    """The whole paper on the embedded data: train zfnet_small with the paper's recipe, run every analysis,
    write the run directory. Its report.html is first written for the main run (about 3 minutes on 2 CPU
    cores), then again with the comparisons (about 16 minutes in all). Ends with the table of findings: each
    claim of the paper, this run's number and its verdict (holds, not shown, reversed)."""

    path = run_demo(out, quick=quick, echo=click.echo, seeds=seeds)
    click.echo(f"run directory: {path.resolve()}")
    click.echo(f"report: {(path / 'report.html').resolve()}   viewer: convscope serve {out}")
    click.echo(findings_text(path))


def _names(value: str | None) -> list[str] | None:
    """Comma-separated names; None when the option was not given (an empty list when it named nothing)."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


_run_arg = click.argument("run", type=_Path(file_okay=False))


# ------------------------------------------------------------------------------ the analyses, from the registry


def _option(param, analysis) -> click.Option:
    """A click option for one keyword of an analysis's ``compute``, typed by its annotation."""
    flag = analysis.flags.get(param.name, "--" + param.name.replace("_", "-"))
    kind, default = str(param.annotation), param.default
    help_ = analysis.help.get(param.name, "")
    if "bool" in kind:
        return click.Option([f"{flag}/--no-{flag[2:]}", param.name], default=default, show_default=True, help=help_)
    if "tuple[str" in kind:
        return click.Option([flag, param.name], multiple=True, default=default, help=help_)
    if "[int" in kind:
        def ints(ctx, p, value):
            try:
                return None if value is None else [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise click.BadParameter(f"expected comma-separated whole numbers, got {value!r}") from None

        shown = ",".join(map(str, default)) if default is not None else None
        return click.Option([flag, param.name], default=shown, callback=ints, show_default=True, help=help_)
    if "list[str" in kind:
        shown = ",".join(default) if default is not None else None
        return click.Option([flag, param.name], default=shown, callback=lambda c, p, v: _names(v),
                            show_default=shown is not None, help=help_)
    typ = float if kind.startswith("float") else int if kind.startswith("int") else str
    return click.Option([flag, param.name], type=typ, default=default, show_default=default is not None, help=help_)


def _analysis_command(analysis) -> click.Command:
    def callback(run: str, **options) -> None:

        main_rank = distributed.init().main  # under torchrun, rank 0 speaks for the job
        r = open_run(run, device=options.pop("device"), workers=options.pop("workers"))
        if any(k in options and options[k] is None for k in ("layers", "layer")) and r.names_defaults() and main_rank:
            click.echo(r.names_defaults())
        result, paths = analysis.run(r, **options)
        if not main_rank:
            return
        if analysis.summary is not None:
            click.echo(analysis.summary(result))
        click.echo(f"wrote {len(paths)} files: " + ", ".join(str(p) for p in paths[:8])
                   + (", ..." if len(paths) > 8 else ""))

    text = f"{analysis.ref}: {analysis.title}. {analysis.caption}"
    return click.Command(analysis.name, callback=callback, help=text, short_help=f"{analysis.ref}: {analysis.title}",
                         params=[click.Argument(["run"], type=_Path(file_okay=False)),
                                 *(_option(p, analysis) for p in analysis.options()), *_compute_options()])


# ------------------------------------------------------------------------------------- the user's own model


@main.command()
@click.option("--model", "spec", required=True,
              help="A built-in model (convscope models), package.module:callable, or path/to/file.py:callable "
                   "returning an nn.Module.")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="A keyword argument of the callable (repeatable); the value is read as JSON where it parses.")
@click.option("--weights", type=_Path(dir_okay=False), default=None,
              help="safetensors or a PyTorch state dict (.pt/.pth; loaded with weights_only=True); also under "
                   "'state_dict' or 'model', with DataParallel's 'module.' prefix.")
@click.option("--weights-key", default=None,
              help="The key of the file's state dict to load (state_dict, state_dict_ema, model, ...). [found: EMA "
                   "weights first, as timm does]")
@click.option("--weights-prefix", default=None,
              help="The prefix of the keys to load, stripped (model. for PyTorch Lightning). [the one that fits]")
@click.option("--data", "data_name", default="folder", show_default=True,
              help="Data set (see `convscope data list`).")
@click.option("--data-root", type=_Path(), default=None, help="Folder of the folder or cifar10 data.")
@click.option("--image-size", type=int, default=None,
              help="Image side the images are read at. [the model's input_size; 224 for a folder]")
@click.option("--normalize", default=None,
              help="What the model does to images in [0, 1]: imagenet, none, or "
                   "MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B.")
@click.option("--classes", "classes_file", type=_Path(dir_okay=False), default=None,
              help="Names of the model's outputs: a JSON list or one per line. [the data's classes when as many]")
@click.option("--nonlinearities", default="error", show_default=True,
              help="deconvnet and guided have rules for ReLU only; 'gradient' passes ReLU6, SiLU, GELU, ... by "
                   "their gradient (as Captum does), and says so on every figure.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val/test split of the data.")
@click.option("--out", required=True, type=_Path(file_okay=False), help="Run directory to make.")
def attach(spec: str, model_args: tuple[str, ...], weights: str | None, weights_key: str | None,
           weights_prefix: str | None, data_name: str, data_root: str | None, image_size: int | None,
           normalize: str | None, classes_file: str | None, nonlinearities: str, seed: int, out: str) -> None:
    """Make a run of your own trained model and images, which every analysis command, the report and the viewer
    then take like a trained run. Nothing is written unless the model builds, the weights fit it completely and
    it takes the images."""

    run = attach_run(spec, data_name, out, data_root=data_root, image_size=image_size, weights=weights,
                     model_args=parse_model_args(model_args), normalize=normalize, classes=classes_file,
                     nonlinearities=nonlinearities, seed=seed, weights_key=weights_key, weights_prefix=weights_prefix)
    click.echo(f"attached {spec} ({len(run.classes)} outputs) on {data_name} at {run.image_size} px: {run.path}")
    click.echo(f"next: convscope layers {out}; convscope scan {out}; convscope report {out}")


@main.command()
@click.argument("run", required=False, type=_Path(file_okay=False))
@click.option("--model", "spec", default=None, help="A model spec instead of a run (as `convscope attach`).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="A keyword argument of --model.")
@click.option("--image-size", type=int, default=None, help="Image side. [the run's; the model's input_size; 224]")
def layers(run: str | None, spec: str | None, model_args: tuple[str, ...], image_size: int | None) -> None:
    """Every module of the model with its output shape, receptive field and stride at the image size, marking
    what an analysis can probe (maps: Fig. 2, occlusion, project; vectors: probes, invariance), the layers the
    analyses use by default (*), and modules the forward pass runs more than once (name#k picks a call)."""

    if (run is None) == (spec is None):
        raise ConvscopeError("give a run directory or --model SPEC (not both)")
    if image_size is not None:
        check_int(image_size, "--image-size", 8, 4096)
    if run is not None:

        r = open_run(run)
        model, size, outputs = r.model, image_size or r.image_size, len(r.classes)
    else:

        model = build_model(spec, parse_model_args(model_args))
        size, outputs = image_size or getattr(model, "input_size", None) or 224, None
    rows = [("module", "type", "output", "field", "stride", "probe")]
    table = layer_table(model, size, outputs)
    for row in table:
        probe = row.probe if row.calls else "not run"
        if row.calls > 1:
            probe += f", runs {row.calls}x: {row.name} = first call, {row.name}#2 ..."
        name = ("* " if row.default else "  ") + row.name + (f" ({row.alias})" if row.alias else "")
        field = f"{row.field} +global" if row.field and row.gated else str(row.field or "-")
        rows.append((name, row.kind, "x".join(map(str, row.shape)) if row.shape else "-",
                     field, "-" if row.stride is None else str(row.stride), probe))
    widths = [max(len(line[c]) for line in rows) for c in range(5)]
    for line in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths)) + "  " + line[5])
    click.echo(f"\nat {size} px; * the layers the analyses use by default; field and stride in pixels")
    if any(row.gated for row in table):
        click.echo("+global: the unit also depends on the whole image through a gate (squeeze-and-excitation, "
                   "group norm's statistics); its field, Fig. 2's patches and the crops follow the convolutional "
                   "path")
    note = nonlinearities_note(model, size, passed=run is not None and r.nonlinearities == "gradient")
    if note:
        click.echo(f"note: {note}")
    if any(row.probe == "channels last" for row in table):
        click.echo("channels last: (N, H, W, C) tensors between two permutes, not probed as maps; probe the "
                   "module after the permute back")


@main.command()
@_run_arg
@click.option("--image", "images", multiple=True, required=True, type=_Path(dir_okay=False),
              help="An image file (repeatable); read at the run's image size (short side scaled, centre crop).")
@click.option("--layer", default=None, help="Layer whose maps are projected. [conv5, or the model's last stage]")
@click.option("--channels", default=None,
              help="Maps to project in every image: all, or comma-separated numbers. [each image's strongest map]")
@click.option("--rule", default="deconvnet", show_default=True, help="deconvnet (the paper), guided, gradient.")
@click.option("--out", required=True, type=_Path(dir_okay=False), help="PNG to write (its numbers beside it "
              "as .json).")
def project(run: str, images: tuple[str, ...], layer: str | None, channels: str | None, rule: str, out: str) -> None:
    """Project maps of one layer in your images back to pixels (paper section 2.1), each from its strongest
    activation, with the image patch under it (its receptive field)."""
    import torch


    r = open_run(run)
    layer = r.check_layers([layer])[0] if layer else r.map_layers()[-1]
    batch = []
    for path in images:
        try:
            batch.append(read_image(path, r.image_size).float() / 255.0)
        except (OSError, ValueError, SyntaxError) as e:
            raise ConvscopeError(f"cannot read image {path!r} ({type(e).__name__}: {e})") from None
    chans = None
    if channels is not None and channels.strip() == "all":
        chans = range(r.channels(layer))
    elif channels is not None:
        try:
            chans = [int(c) for c in channels.split(",") if c.strip()]
        except ValueError:
            raise ConvscopeError(f"--channels takes all or comma-separated numbers, got {channels!r}") from None
    sheet = project_images(r.model, torch.stack(batch), layer, chans, rule=rule, nonlinearities=r.nonlinearities,
                           names=[Path(p).name for p in images])
    paths = write_sheet(sheet, out)
    click.echo(f"projected {sheet.channels.shape[1]} map(s) of {layer} in {len(images)} image(s); wrote "
               + ", ".join(map(str, paths)))


@main.command()
@_train_options
@click.option("--variants", default=None,
              help="Comma-separated Table 3 variants (full, no_conv34, no_fc7, no_fc67, no_conv34_fc67, fc_half, "
                   "fc_double, wide_conv345, wide_conv345_fc_double). [all]")
@click.option("--out", required=True, type=_Path(file_okay=False),
              help="Folder of the variant runs (each resumable; a finished one is not retrained).")
def ablate(out: str, variants: str | None, **kw) -> None:
    """Table 3: train the variants of a model (layers removed or resized) with the same data, budget and seed,
    and write a table of train and validation errors beside the paper's."""

    result, paths = ablate_run(_resolve(**kw), out, _names(variants))
    click.echo(ablation_table(result))
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@main.command()
@click.argument("runs", nargs=-1, required=True, type=_Path(file_okay=False))
@click.option("--out", default=None, type=_Path(dir_okay=False),
              help="Write the findings over RUNS (one training seed each) to this JSON file.")
def findings(runs: tuple[str, ...], out: str | None) -> None:
    """Print the claims RUN's analyses tested, each with its contrast, 95% interval and verdict (holds, not shown,
    reversed), from RUN/findings.json. Several runs (the same demo at other training seeds) are combined: a claim
    holds when it holds at every seed, and its interval is the range of the seeds' contrasts."""

    per_run = [read_findings(Layout(require_run(r)).findings) for r in runs]
    combined = per_run[0] if len(runs) == 1 else combine(per_run)
    if not combined:
        raise click.ClickException(f"no findings in {', '.join(runs)}: run the analyses (convscope demo, or "
                                   "convscope correspondence RUN ...) first")
    click.echo(findings_table(combined))
    if out is not None:
        click.echo(f"wrote {write_findings(out, combined)}")


@main.command()
@_run_arg
def report(run: str) -> None:
    """Write RUN/report.html: every figure and table of the paper the run has, beside the paper's numbers, with
    the config, the model and the timings. Opens from file:// with no server; says what is missing."""

    click.echo(f"wrote {build_report(run)}")


@main.command()
@_run_arg
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep it local).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
def serve(run: str, host: str, port: int) -> None:
    """Browse every layer and unit of RUN in a local web viewer: /layer/conv5/unit/42; arrow keys move between
    units, [ and ] (or up/down) between layers, ? shows the keys."""

    run_viewer(run, host=host, port=port, announce=lambda url: click.echo(f"serving {run} at {url} (Ctrl-C to stop)"))
