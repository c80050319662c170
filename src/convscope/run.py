"""A run: a model, the images it is examined on, and the directory its analyses write into.

Two kinds, which every analysis, the report and the viewer take the same way:

- **trained**: ``convscope train`` made it (``config.json``; the final weights, epoch checkpoints, metrics);
- **attached**: ``convscope attach`` or :func:`attach` made it from the user's own model, weights and images
  (``attach.json``: the model spec, the weights file and its SHA-256, the data, the input normalisation).

:func:`open_run` reopens either. A :class:`Run` reads one split of its data at a time, knows the names of the
model's outputs, and says which layers an analysis uses by default: the paper's conv1..conv5 (fc6, fc7) on the
built-in models, the stages of any other model (:mod:`convscope.layers`).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import artifacts, layers
from .checkpoint import load_model
from .config import TrainConfig
from .data import ALL, SPLITS, DataSpec, ImageSet, stratified_split
from .deconvnet import NONLINEARITIES, nonlinearities_note
from .distributed import device as resolve
from .errors import ConvscopeError, check_int, unknown
from .forward import Preprocessing, eval_mode, on_device, preprocessing, run_to
from .layers import ModuleInfo, census, site
from .layout import Layout
from .models import create_model, list_models
from .usermodel import (
    FORMAT,
    accepts,
    add_normalization,
    build_model,
    check_input,
    infer_num_classes,
    parse_normalize,
    read_classes,
)
from .weights import find_weights, fit, load_weights, read_state_dict, read_weights_file, sha256, state_sha256


@dataclass
class Run:
    """A model and its data, and the run directory (``layout``) analyses write into. ``classes`` names the
    model's outputs. Trained runs carry their ``config``; attached runs their ``attach.json`` (``attached``).
    ``workers``: processes that decode an ImageFolder's images (:mod:`convscope.data.loader`)."""

    layout: Layout
    model: nn.Module
    classes: list[str]
    data: DataSpec | None
    config: TrainConfig | None = None
    attached: dict[str, Any] | None = None
    nonlinearities: str = "error"
    workers: int = 0
    _splits: dict[str, ImageSet] = field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return self.layout.root

    @property
    def kind(self) -> str:
        return "trained" if self.config is not None else "attached"

    @property
    def name(self) -> str:
        """A short label: ``zfnet_small (30 ep)``, ``zfnet_small no renorm (10 ep)``, or the attached spec."""
        if self.config is not None:
            cfg = self.config
            return f"{cfg.model}{'' if cfg.renorm else ' no renorm'} ({cfg.epochs} ep)"
        return str(self.attached.get("model") or "model") if self.attached else "model"

    @property
    def image_size(self) -> int:
        size = self.data.image_size if self.data is not None else None
        size = size or getattr(self.model, "input_size", None)
        return int(size) if size else int(self.split(self.default_split("val")).image_size)

    # --- data
    def split(self, name: str, stream: bool = False) -> ImageSet:
        """One split of the run's data (``train``, ``val``, ``test``, ``all``), read once and kept. ``stream``: an
        image folder's split not read yet is not read into memory but decoded as its batches are asked for (its
        memory independent of its size), and not kept."""
        if name not in (*SPLITS, ALL):
            raise unknown("split", name, (*SPLITS, ALL))
        if stream and name not in self._splits and self.data is not None and self.data.name == "folder":
            return self.data.load(name, workers=self.workers, lazy=True)
        if name not in self._splits:
            if self.data is None:  # attached from Python with images in memory: split them here
                every = self._splits[ALL]
                parts = stratified_split(every.labels, (0.7, 0.15), 0)
                self._splits.update({s: every.subset(p) for s, p in zip(SPLITS, parts)})
            else:
                self._splits[name] = self.data.load(name, workers=self.workers)
        return self._splits[name]

    def default_split(self, preferred: str) -> str:
        """The split an analysis reads unless told: ``preferred`` (the paper's) on a trained run; every image on
        an attached one, whose images the model never trained on here."""
        return preferred if self.kind == "trained" else ALL

    def labels(self, data: ImageSet) -> torch.Tensor:
        """The images' classes as indices of the model's outputs: by name, or as they are when the data's classes
        are the model's; -1 for a class the model does not have."""
        if list(data.classes) == list(self.classes):
            return data.labels.clone()
        index = {name: i for i, name in enumerate(self.classes)}
        mapping = torch.tensor([index.get(name, -1) for name in data.classes], dtype=torch.long)
        return mapping[data.labels]

    def targets(self, data: ImageSet, index: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Images ``index`` of ``data`` as classes of the model: the true class where the model has it (source
        ``"true"``), else the model's own prediction (``"predicted"``: a class the model was not trained on)."""

        labels = self.labels(data)[index]
        unknown_ = labels < 0
        if unknown_.any():
            with torch.no_grad(), eval_mode(self.model):
                predicted = self.model(data.batch(index[unknown_])[0]).argmax(1).cpu()
            labels[unknown_] = predicted
        return labels, ["predicted" if u else "true" for u in unknown_.tolist()]

    # --- models
    @property
    def device(self) -> torch.device:
        """Where the model computes (every analysis runs there: :meth:`to`)."""
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def to(self, device: str | torch.device | None) -> Run:
        """Move the model to ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``auto``; see
        :func:`convscope.distributed.device`), its inputs following it; None leaves it where it is."""

        if device is not None:
            on_device(self.model, resolve(device))
        return self

    @cached_property
    def fingerprint(self) -> str:
        """What identifies the run's weights: the SHA-256 of a trained run's final weights file, or of an attached
        model's state (recorded when attached and checked when reopened)."""

        if self.config is not None:
            return sha256(self.layout.final)
        return str(self.attached.get("state_sha256", "")) if self.attached else ""

    @cached_property
    def checkpoints(self) -> dict[int, Path]:
        """Epoch -> weights file of the epochs the run saved (trained runs; an attached run names a folder of its
        own, see :func:`convscope.evolution.checkpoints_in`)."""
        return self.layout.saved_epochs()

    def model_at(self, path: str | Path) -> nn.Module:
        """The run's model with the weights of another file (an epoch checkpoint), in eval mode."""

        if self.kind == "trained":
            return on_device(load_model(path)[0], self.device)
        model = self.new_model()
        load_weights(model, path)
        return on_device(model, self.device).eval()

    def new_model(self, num_classes: int | None = None, seed: int = 0) -> nn.Module:
        """A fresh model of the run's architecture (initialised under ``seed``; ``num_classes`` outputs, where
        the architecture takes that argument), with the run's input normalisation."""

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.config is not None:
                return create_model(self.config.model, num_classes=num_classes or len(self.classes),
                                    **self.config.model_options)
            spec = self.attached.get("model") if self.attached else None
            if spec is None:
                raise ConvscopeError("this run was attached from Python with a model object, so convscope cannot "
                                     "build its architecture anew; attach a model spec instead")
            args = dict(self.attached.get("model_args") or {})
            if num_classes is not None:
                if not accepts(spec, "num_classes"):
                    raise ConvscopeError(f"model spec {spec!r} takes no num_classes argument, so convscope cannot "
                                         f"build it with {num_classes} outputs")
                args["num_classes"] = num_classes
            model = build_model(spec, args)
        norm = self.attached.get("normalize")
        return add_normalization(model, norm["mean"], norm["std"], _source(norm)) if norm else model

    # --- layers
    @cached_property
    def modules(self) -> list[ModuleInfo]:
        """Every module of the model after one forward pass at the run's image size."""
        return census(self.model, self.image_size)

    @property
    def preprocessing(self) -> Preprocessing:
        """What the images in [0, 1] go through before the model's first module (its declared normalisation, and
        whether they follow the model to its device), as values. A built-in net normalises inside (its
        ``normalize`` module, the training set's mean image): nothing is declared for it."""
        return preprocessing(self.model)

    @cached_property
    def paper_names(self) -> dict[str, str]:
        """The paper's layer names the model has (``conv1`` .. ``fc7`` -> module name); empty for other models."""
        return layers.paper_names(self.model)

    def map_layers(self) -> list[str]:
        """The layers with feature maps an analysis shows by default: conv1..conv5, or the model's stages."""
        return layers.map_layers(self.model, self.modules)

    def vector_layer(self) -> str:
        """The paper's layer 7 (fc7), or the model's penultimate module (the last before the logits)."""
        return layers.vector_layer(self.model, self.modules, len(self.classes))

    def output_layer(self) -> str:
        """The module whose output is the model's logits (a class's map starts there)."""
        return layers.output_layer(self.modules, (1, len(self.classes)))

    def feature_layers(self) -> list[str]:
        """Every layer whose features the probes read by default: conv1..fc7, or the stages and the penultimate."""
        return layers.feature_layers(self.model, self.modules, len(self.classes))

    def channels(self, layer: str) -> int:
        """How many maps (or units) ``layer`` has: from the census, or (a module's later call) one forward pass."""
        s = site(self.model, layer)
        info = next((i for i in self.modules if i.name == s.name), None)
        if s.call == 1 and info is not None and info.shape is not None and len(info.shape) >= 2:
            return int(info.shape[1])

        param = next(self.model.parameters())
        x = torch.zeros(1, 3, self.image_size, self.image_size, dtype=param.dtype, device=param.device)
        with torch.no_grad(), eval_mode(self.model):
            return int(run_to(self.model, site(self.model, layer), x).shape[1])

    def names_defaults(self) -> str | None:
        """For a model without the paper's layer names: which of its layers the analyses use unless told."""
        if self.paper_names:
            return None
        return (f"layers: this model has no conv1..fc7, so the analyses use its stages {', '.join(self.map_layers())} "
                f"(the last module at each map size) and its penultimate module {self.vector_layer()}; choose others "
                f"with --layers or --layer (see `convscope layers {self.path}`)")

    def check_layers(self, layers: list[str]) -> list[str]:
        """Every name resolved (unknown ones list the valid names), each once, in the order the forward pass
        reaches them (a module's ``#k`` call after its first); a module that runs more than once and is named
        without ``#k`` gets a warning that its first call is meant."""
        if not layers:
            raise ConvscopeError("no layers named: give one or more layer names (see `convscope layers RUN`)")
        infos = {info.name: info for info in self.modules}
        reached = {}
        for layer in dict.fromkeys(layers):
            s = site(self.model, layer)
            info = infos.get(s.name)
            if info is not None and info.probe == "channels last":
                maps = [i.name for i in self.modules if i.maps and s.name.startswith(i.name + ".")]
                raise ConvscopeError(
                    f"layer {layer!r} gives channels-last tensors ({'x'.join(map(str, info.shape[1:]))}: rows, "
                    f"columns, channels), not feature maps; probe a module whose output has its channels first"
                    + (f", such as the block around it, {maps[-1]}" if maps else "")
                    + f" (see `convscope layers {self.path}`)")
            calls = info.calls if info is not None else 1
            if calls > 1 and "#" not in layer:
                warnings.warn(f"module {s.name!r} runs {calls} times in one forward pass; convscope probes "
                              f"its first call (name {s.name}#2 .. #{calls} for another; Captum's hooks see "
                              "the last)", stacklevel=2)
            order = info.order if info is not None and info.order >= 0 else len(infos)
            reached[layer] = (order, s.call)
        return sorted(reached, key=reached.__getitem__)


# ----------------------------------------------------------------------------------------------- opening


def open_run(path: str | Path, device: str | torch.device | None = None, workers: int = 0) -> Run:
    """Open a trained or attached run directory; a directory that is neither says what is missing. ``device``: where
    its model computes (default: the CPU, where it is loaded); ``workers``: processes that decode its images."""

    check_int(workers, "workers", 0, 1024)
    device = None if device is None else resolve(device)  # a device this machine lacks fails before any reading
    run = _open(Layout(path))
    run.workers = workers
    if device is not None:
        on_device(run.model, device)
    return run


def _open(layout: Layout) -> Run:
    if layout.attach.is_file():
        return _open_attached(layout)
    if not layout.config.is_file():
        raise ConvscopeError(f"{str(layout.root)!r} is not a convscope run (no {layout.config.name} or "
                             f"{layout.attach.name}); train one with `convscope train`, or attach your own model "
                             "with `convscope attach`")
    if not layout.final.is_file():
        raise ConvscopeError(f"the run {str(layout.root)!r} has not finished training (no {layout.final.name}); run "
                             "the same `convscope train` command again to resume it")

    config = _read_config(layout)
    model, info = load_model(layout.final)
    return Run(layout, model, info["classes"], config.data_spec(), config=config)


def _read_config(layout: Layout) -> TrainConfig:
    """A trained run's config, checked: damaged, it names the file and how to rebuild it."""
    fix = ("it is the run's record of how it was trained: restore it, or train the run again into a new "
           "directory")
    try:
        d = json.loads(layout.config.read_text())
    except (OSError, ValueError) as e:
        raise ConvscopeError(f"{str(layout.config)!r} is not valid JSON ({e}); {fix}") from None
    if not isinstance(d, dict):
        raise ConvscopeError(f"{str(layout.config)!r} holds a {type(d).__name__}, not a run's config; {fix}")
    try:
        return TrainConfig.from_dict(d)
    except ConvscopeError as e:
        raise ConvscopeError(f"{str(layout.config)!r} is damaged: {e}; {fix}") from None


def _read_record(layout: Layout) -> dict[str, Any]:
    try:
        record = json.loads(layout.attach.read_text())
    except (OSError, ValueError) as e:
        raise ConvscopeError(f"{str(layout.attach)!r} is damaged ({e}); attach the model again into a new "
                             "directory") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ConvscopeError(f"{str(layout.attach)!r} is not a convscope attachment (format {FORMAT})")
    return record


def _source(norm: dict) -> str:
    """Where an attached model's input normalisation comes from, as ``attach.json`` records it."""
    return str(norm.get("source") or "attach.json")


def _open_attached(layout: Layout) -> Run:

    record = _read_record(layout)
    if record.get("model") is None:
        raise ConvscopeError(f"{str(layout.root)!r} was attached from Python with a model object, which the command "
                             "line cannot rebuild; call the analyses from Python on the run cs.attach returned, or "
                             "attach a model spec (convscope attach --model SPEC)")
    model = _build(record["model"], record.get("model_args") or {}, record.get("seed", 0))
    weights = record.get("weights")
    if weights is not None:
        if not Path(weights).is_file():
            raise ConvscopeError(f"the run's weights file {weights!r} is gone; restore it, or attach again")
        now = sha256(weights)
        if now != record.get("weights_sha256"):
            raise ConvscopeError(f"the weights file {weights!r} changed since it was attached (SHA-256 "
                                 f"{record.get('weights_sha256', '?')[:12]}... then, {now[:12]}... now); restore it, "
                                 "or attach it again into a new run directory")
        load_weights(model, weights, record.get("weights_key"), record.get("weights_prefix"))
    if record.get("state_sha256") not in (None, state_sha256(model.state_dict())):
        raise ConvscopeError(f"the model that {record['model']!r} builds now differs from the one attached (its code "
                             "or its weights changed); attach it again into a new run directory")
    norm = record.get("normalize")
    if norm:
        add_normalization(model, norm["mean"], norm["std"], _source(norm))
    if record["data"].get("in_memory"):
        raise ConvscopeError(f"{str(layout.root)!r} was attached from Python with images in memory, which the "
                             "command line cannot read again; attach a data set by name (--data, --data-root)")
    data = DataSpec(**{**record["data"], "classes": _tuple(record["data"].get("classes"))})
    return Run(layout, model.eval(), list(record["classes"]), data, attached=record,
               nonlinearities=record.get("nonlinearities", "error"))


def _tuple(value):
    return None if value is None else tuple(value)


# --------------------------------------------------------------------------------------------- attaching


def attach(model: nn.Module | str, data: str | ImageSet = "folder", out: str | Path = "runs/attached", *,
           data_root: str | Path | None = None, image_size: int | None = None, weights: str | Path | None = None,
           model_args: dict[str, Any] | None = None, normalize=None, classes: str | Path | list[str] | None = None,
           nonlinearities: str = "error", seed: int = 0, weights_key: str | None = None,
           weights_prefix: str | None = None) -> Run:
    """Make ``out`` a run of the user's own model, which every analysis then takes like a trained run.

    ``model``: an ``nn.Module`` (from a notebook; the run then lives in this process), or a spec the command
    line can rebuild: a built-in name, ``package.module:callable`` or ``path/to/file.py:callable``, called with
    ``model_args``. ``weights``: a safetensors or PyTorch state dict file, loaded with ``weights_only=True``.
    ``data``: a data set name (``folder`` with ``data_root``, ``cifar10``, ``digits``, ``synthetic``, ``pairs``)
    or an :class:`~convscope.data.ImageSet` in memory; ``image_size`` the side the images are read at (default:
    the model's ``input_size``, else the data set's own). ``normalize``: ``"imagenet"``, six numbers (mean and
    std per channel) or None: what the model does to images in [0, 1] before its first layer. ``classes``: the
    names of the model's outputs (a list, or a file: a JSON list or one per line); default the data's classes
    when they are as many, else their indices. ``nonlinearities="gradient"`` lets deconvnet and guided pass
    nonlinearities other than ReLU by their gradient (recorded, and noted on every figure it affects).

    Everything is checked before anything is written: the spec imports and builds an ``nn.Module``, the weights
    fit it completely, the model takes the images. ``out`` must be new, empty, or hold this same attachment.
    """

    layout = Layout(out)
    _check_out(layout)
    if nonlinearities not in NONLINEARITIES:
        raise unknown("nonlinearities option", nonlinearities, NONLINEARITIES)
    norm = parse_normalize(normalize)
    names = (read_classes(classes) if isinstance(classes, str | Path) else list(classes)) if classes else None
    if isinstance(data, ImageSet):
        spec_data, every, data_classes = None, data, list(data.classes)
    else:
        root = None if data_root is None else str(Path(data_root).resolve())
        spec_data, every = DataSpec(str(data), root, image_size, seed), None
        spec_data.check()
        data_classes = spec_data.class_names()

    raw = read_weights_file(weights) if weights is not None else None  # read once: files of 100 MB are common
    state = read_state_dict(weights, raw) if weights is not None else None
    args = dict(model_args or {})
    if isinstance(model, nn.Module):  # the caller's object is copied before anything of ours touches it
        net = copy.deepcopy(model) if norm or state is not None else model
    else:
        if "num_classes" not in args and _builtin(model):
            args["num_classes"] = _outputs(names, state, data_classes)
        net = _build(str(model), args, seed)
    found = None
    if weights is not None:
        found = find_weights(net, weights, weights_key, weights_prefix, raw)
        fit(net, found.state, weights, "the model" if isinstance(model, nn.Module) else f"model {model!r} with "
                                                                                        f"arguments {args}")
        if found.note():
            warnings.warn(f"weights: {found.note()} (to choose otherwise: --weights-key, --weights-prefix)",
                          stacklevel=2)
    record = {"format": FORMAT, "model": None if isinstance(model, nn.Module) else str(model), "model_args": args,
              "weights": None if weights is None else str(Path(weights).resolve()), "nonlinearities": nonlinearities,
              "seed": seed, "state_sha256": state_sha256(net.state_dict())}
    if found is not None:
        record.update(weights_sha256=sha256(weights), weights_key=found.key, weights_prefix=found.prefix)

    # a model of the user's own that does not say its size: 224 for an image folder (ImageNet's), else the data's
    size = image_size or _own_size(net) or (every.image_size if every is not None else
                                            224 if spec_data.name == "folder" else spec_data.image_size) or 32
    if every is not None and every.image_size != size:
        raise ConvscopeError(f"the images are {every.image_size} px but the run's image size is {size}; resize them "
                             f"or pass image_size={every.image_size}")
    imagenet = isinstance(normalize, str) and normalize.strip().lower() == "imagenet"
    source = "ImageNet's mean and std, given to attach" if imagenet else "the mean and std given to attach"
    if norm:
        add_normalization(net, *norm, source)
    outputs = check_input(net, size)[1]
    if nonlinearities == "error":  # said now, not when the first scan stops on them
        note = nonlinearities_note(net, size)
        if note:
            warnings.warn(note, stacklevel=2)
    if names is not None and len(names) != outputs:
        raise ConvscopeError(f"the classes file names {len(names)} classes, but the model has {outputs} outputs")
    if names is None:
        names = data_classes if len(data_classes) == outputs else [str(i) for i in range(outputs)]
    if spec_data is not None:
        spec_data = DataSpec(spec_data.name, spec_data.root, size, seed)
    record.update(
        data=({"name": spec_data.name, "root": spec_data.root, "size": size, "seed": seed} if spec_data else
              {"name": every.name or "images", "in_memory": True, "images": len(every), "size": size}),
        image_size=size, classes=names, normalize={"mean": norm[0], "std": norm[1], "source": source} if norm else None)
    with artifacts.lock(layout.root, "convscope attach"):
        _check_out(layout)
        artifacts.clean(layout.root)
        _claim(layout, record)
    run = Run(layout, net.eval(), names, spec_data, attached=record, nonlinearities=nonlinearities)
    if every is not None:
        run._splits[ALL] = every
    return run


def _build(spec: str, args: dict[str, Any], seed: int) -> nn.Module:
    """The spec's model initialised under ``seed``, so that a model attached without a weights file reopens with
    the same weights (the global generator is left as it was)."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec, args)


def _builtin(spec: str) -> bool:

    return spec in list_models()


def _outputs(names, state, data_classes) -> int:
    """How many outputs a built-in model gets: as many as the class names, the weights' last layer, or the data's
    classes, in that order."""

    if names:
        return len(names)
    if state is not None and infer_num_classes(state):
        return infer_num_classes(state)
    return len(data_classes)


def _own_size(model: nn.Module) -> int | None:
    size = getattr(model, "input_size", None)
    return size if isinstance(size, int) else None


def _check_out(layout: Layout) -> None:
    root = layout.root
    if root.exists() and not root.is_dir():
        raise ConvscopeError(f"{str(root)!r} exists and is not a directory; choose a new run directory")
    if root.is_dir() and any(not artifacts.is_temp(e.name) for e in root.iterdir()) and not layout.attach.is_file():
        raise ConvscopeError(f"{str(root)!r} exists and is neither empty nor an attached run; choose a new or empty "
                             "directory")


def _claim(layout: Layout, record: dict[str, Any]) -> None:
    """Write ``attach.json``, or check that the one there records this same attachment."""
    wanted = json.loads(json.dumps(record))
    if layout.attach.is_file():
        have = _read_record(layout)
        if have != wanted:
            diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
            raise ConvscopeError(f"{str(layout.root)!r} already holds another attachment (it differs in "
                                 f"{', '.join(diff)}); choose another directory, or repeat that attachment")
        return
    artifacts.write_json(layout.attach, wanted)


__all__ = ["Run", "attach", "open_run"]
