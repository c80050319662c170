"""Feature visualisation by optimisation: for a unit of a layer, the image the model itself says excites it most.

Zeiler & Fergus's Fig. 2 shows what excites a unit among a data set's images; this asks the model instead, by
gradient ascent on the input, as Olah, Mordvintsev & Schubert do ("Feature Visualization", Distill 2017) with the
recipe of Lucid (github.com/tensorflow/lucid) and its PyTorch port Lucent (github.com/greentfrapp/lucent):

- the image is parameterised in a decorrelated space: its Fourier coefficients, scaled by 1/frequency so that
  every frequency starts with the energy it has in natural images (plain pixels let the optimiser pile up high-
  frequency noise), and its colours by the square root of ImageNet's colour covariance; a sigmoid puts the
  result in [0, 1], the pixel space convscope's models take (they normalise inside);
- every step sees the image padded, jittered, scaled and rotated at random (Lucid's ``standard_transforms``):
  only patterns that survive small shifts are rewarded, not pixel-exact adversarial noise;
- the objective (ascended by Adam) is the unit at the centre of its map (Lucid's "neuron" objective, the
  default): the unit as the scan measures it, one position, so its optimised image compares with its strongest
  data-set activation; or its mean over the map (Lucid's "channel"), a texture that fills the image.

All units of one layer are optimised at once, one image per unit (row i of the batch maximises unit i). Every
random number comes from one ``torch.Generator`` seeded by ``seed``: the same seed gives the same images, bit
for bit, on the CPU. Only the image gets gradients (``torch.autograd.grad``): the model's parameters and their
``requires_grad`` are left as they are, and the model runs in eval mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import artifacts
from .analyses import LAYERS_HELP, Analysis, register
from .errors import ConvscopeError, check_int, check_seed, unknown
from .forward import eval_mode, run_to
from .imaging import make_grid, tensor_to_pil, upscale
from .layers import site
from .layout import Layout, natural_key
from .panels import Panel, Picture
from .views import select_units

if TYPE_CHECKING:
    from .run import Run

# Lucid's square root of ImageNet's colour covariance (lucid/optvis/param/color.py): column j is the RGB colour
# that decorrelated channel j adds; column 0 is the near-grey luminance direction.
COLOR_SVD_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
PAD, JITTER_1, JITTER_2 = 12, 8, 4  # Lucid's standard_transforms, in pixels
SCALES = tuple(1 + (i - 5) / 50 for i in range(11))  # 0.9 .. 1.1
ANGLES = (*range(-10, 11), 0, 0, 0, 0, 0)  # degrees; 0 more often than the others, as Lucid draws them


# ------------------------------------------------------------------------------------- the parameterisation


def color_matrix() -> torch.Tensor:
    """Lucid's colour decorrelation: ``COLOR_SVD_SQRT`` divided by its largest column norm, so that a unit step in
    any decorrelated channel moves the colour by at most 1 (the luminance column has norm exactly 1)."""
    m = torch.tensor(COLOR_SVD_SQRT, dtype=torch.float64)
    return m / m.norm(dim=0).max()


def spectrum_scale(h: int, w: int) -> torch.Tensor:
    """1 / frequency for each coefficient of an (h, w) real FFT (h, w // 2 + 1), the lowest capped at 1/max(h, w):
    natural images have about this spectrum, so parameters of equal size give an image of natural statistics."""
    f = torch.sqrt(torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2
                   + torch.fft.rfftfreq(w, dtype=torch.float64)[None, :] ** 2)
    return 1.0 / f.clamp_min(1.0 / max(h, w))


def init_spectrum(n: int, size: int, generator: torch.Generator, sd: float = 0.01) -> torch.Tensor:
    """Lucid's start: small random Fourier coefficients (real and imaginary parts), (n, 3, size, size // 2 + 1, 2);
    the image they give is grey (0.5) with faint low-frequency colour noise."""
    return torch.randn(n, 3, size, size // 2 + 1, 2, generator=generator, dtype=torch.float64) * sd


def spectrum_to_image(spectrum: torch.Tensor, size: int) -> torch.Tensor:
    """The (n, 3, size, size) image in [0, 1] that Fourier coefficients stand for (Lucid's ``fft_image`` then
    ``to_valid_rgb``): scale by 1/frequency, inverse FFT, divide by Lucid's 4 (less saturation), mix colours by
    the decorrelation matrix, sigmoid."""
    scale = spectrum_scale(size, size).to(spectrum.device, spectrum.dtype)[..., None]
    image = torch.fft.irfftn(torch.view_as_complex((scale * spectrum).contiguous()), s=(size, size),
                             dim=(-2, -1), norm="ortho") / 4.0
    color = color_matrix().to(spectrum.device, spectrum.dtype)
    return torch.sigmoid(torch.einsum("ij,njhw->nihw", color, image))


# ------------------------------------------------------------------------------------- the transforms


def random_transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Lucid's ``standard_transforms``, one draw per image: pad by 12 px of grey, shift by up to +-4 px, scale by
    0.9..1.1, rotate by -10..10 degrees, shift by up to +-2 px; one affine resampling (``grid_sample``), the
    border grey. The result is 24 px larger than the input, as in Lucid."""
    n = images.shape[0]
    padded = F.pad(images, [PAD] * 4, value=0.5)
    side = padded.shape[-1]

    def shift(d: int) -> torch.Tensor:  # Lucid's jitter(d): a random crop, i.e. a shift by -d/2 .. d/2 pixels
        return (torch.randint(0, d + 1, (n, 2), generator=generator) - d // 2).double() * 2 / side

    t1 = shift(JITTER_1)
    s = torch.tensor(SCALES, dtype=torch.float64)[torch.randint(len(SCALES), (n,), generator=generator)]
    a = torch.tensor(ANGLES, dtype=torch.float64)[torch.randint(len(ANGLES), (n,), generator=generator)]
    t2 = shift(JITTER_2)
    # output point p comes from input point A p + b, with A = R(-angle) / scale and b = -A t2 - t1 (the inverse
    # of: shift t1, scale, rotate, shift t2; normalised coordinates, the image's centre at 0)
    cos, sin = torch.cos(torch.deg2rad(a)) / s, torch.sin(torch.deg2rad(a)) / s
    A = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    b = -(A @ t2[..., None])[..., 0] - t1
    theta = torch.cat([A, b[..., None]], -1).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(padded.shape), align_corners=False)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------------------- the optimisation


def layer_output(model: nn.Module, target, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output, and what the objective ascends: the same, or, where the layer is a ReLU (the paper's
    conv1..conv5 are), its input. A unit that is zero everywhere on the grey start has no gradient after the
    ReLU and would stay grey; before it, it climbs (Lucid visualises ``*_pre_relu`` layers for this reason)."""
    if not isinstance(target.module, nn.ReLU):
        out = run_to(model, target, x)
        return out, out
    inputs = []
    with target.module.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone())):
        out = run_to(model, target, x)  # clone: an in-place ReLU would overwrite its input
    return out, inputs[target.call - 1]


def unit_maps(act: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Row i's map of unit ``units[i]``, flattened: (n, positions); an fc layer's unit is a map of one position."""
    return act.reshape(act.shape[0], act.shape[1], -1)[torch.arange(len(units)), units]


OBJECTIVES = ("neuron", "channel")


def objective_of(act: torch.Tensor, units: torch.Tensor, objective: str) -> torch.Tensor:
    """What row i ascends: unit ``units[i]`` at the centre of its map ("neuron"), or its mean over the map
    ("channel"); an fc layer's unit either way."""
    if objective == "neuron" and act.dim() == 4:
        h, w = act.shape[2:]
        return act[torch.arange(len(units)), units, h // 2, w // 2]
    return unit_maps(act, units).mean(1)


@dataclass
class Visualization:
    """One layer: ``images[i]`` (3, H, W) in [0, 1] maximises unit ``units[i]``; ``activations[i]`` is the
    unit's strongest activation in it (the max over its map, as the scan measures a data set's images)."""

    layer: str
    units: torch.Tensor
    images: torch.Tensor
    activations: torch.Tensor
    seconds: float


def visualize_units(model: nn.Module, layer: str, units, size: int, steps: int = 256, seed: int = 0,
                    lr: float = 0.05, progress: bool | None = False, objective: str = "neuron") -> Visualization:
    """Optimise one image per unit of ``layer`` (all in one batch) for ``steps`` Adam steps at ``lr``: each step
    the images are transformed at random and the sum over rows of each unit's ``objective`` (:func:`objective_of`)
    is ascended (before the ReLU, where the layer is one: :func:`layer_output`)."""
    if objective not in OBJECTIVES:
        raise unknown("objective", objective, OBJECTIVES)
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
    param = next(model.parameters())
    target = site(model, layer)
    padded = size + 2 * PAD  # what the model sees while optimising: a layer after a fixed-size fc cannot take it
    try:
        with torch.no_grad(), eval_mode(model):
            out = run_to(model, target, torch.zeros(1, 3, padded, padded, dtype=param.dtype, device=param.device))
    except RuntimeError as e:
        raise ConvscopeError(f"the model cannot run to layer {layer!r} on a {padded} px image, the size the random "
                             f"transforms make of {size} px ({e}); visualise a convolutional layer") from None
    channels = out.shape[1] if out.dim() > 1 else 0
    bad = units[(units < 0) | (units >= channels)]
    if not len(units):
        raise ConvscopeError("no units named: give one or more unit numbers")
    if bad.numel():
        raise ConvscopeError(f"unit {int(bad[0])} out of range: layer {layer!r} has {channels} units "
                             f"(0..{channels - 1})")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    spectrum = init_spectrum(len(units), size, generator).to(param.device, torch.float32).requires_grad_(True)
    optimizer = torch.optim.Adam([spectrum], lr=lr)
    dev_units = units.to(param.device)
    with eval_mode(model):
        for _ in tqdm(range(steps), desc=f"visualize {layer}", unit="step", leave=False,
                      disable=None if progress is None else not progress):
            x = random_transform(spectrum_to_image(spectrum, size), generator).to(param.dtype)
            ascended = objective_of(layer_output(model, target, x)[1], dev_units, objective).sum()
            spectrum.grad = torch.autograd.grad(-ascended, [spectrum])[0]
            optimizer.step()
        with torch.no_grad():
            images = spectrum_to_image(spectrum, size)
            activations = unit_maps(run_to(model, target, images.to(param.dtype)), dev_units).amax(1)
    return Visualization(layer, units, images.detach().float().cpu(), activations.float().cpu(),
                         time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- a run


@dataclass
class VisualizeResult:
    """Every layer's visualisations, and how they were made."""

    layers: dict[str, Visualization]
    seed: int
    steps: int


def compute(run: Run, layers: list[str] | None = None, units: int = 16, steps: int = 256, seed: int = 0,
            objective: str = "neuron", progress: bool | None = None) -> VisualizeResult:
    """For ``units`` seeded units of each of ``layers`` (0: all; default the run's map layers), the image that
    maximises each (``objective``: :func:`objective_of`), optimised for ``steps`` steps at the run's image size.
    Every option is checked before any optimisation starts."""
    if objective not in OBJECTIVES:
        raise unknown("objective", objective, OBJECTIVES)
    check_int(units, "units (0 for all)", 0)
    check_int(steps, "steps", 1, 10000)
    check_seed(seed)
    layers = run.check_layers(list(layers)) if layers is not None else run.map_layers()
    chosen = {}
    for layer in layers:
        channels = run.channels(layer)
        if units > channels:
            raise ConvscopeError(f"units {units}: layer {layer!r} has only {channels} units; ask for at most "
                                 f"{channels}, or 0 for all of them")
        chosen[layer] = select_units(channels, units or None, seed)
    return VisualizeResult({layer: visualize_units(run.model, layer, u, run.image_size, steps, seed,
                                                   progress=progress, objective=objective)
                            for layer, u in chosen.items()}, seed, steps)


def write_visualize(result: VisualizeResult, layout: Layout) -> list[Path]:
    """One PNG per unit (the optimised image at the run's size, ``layout.visualization``), each layer's units in
    one grid (``figures/visualize_<layer>.png``, what the report shows) and the numbers in
    ``layout.visualize_numbers``, where the layers of earlier runs are kept beside these."""
    numbers = artifacts.read_json(layout.visualize_numbers)
    numbers = numbers if isinstance(numbers, dict) else {}
    paths = []
    for layer, vis in result.layers.items():
        for unit, image in zip(vis.units.tolist(), vis.images):
            paths.append(artifacts.save_image(layout.visualization(layer, unit), tensor_to_pil(image)))
        numbers[layer] = {"units": vis.units.tolist(), "activations": vis.activations.tolist(),
                          "seed": result.seed, "steps": result.steps, "seconds": round(vis.seconds, 3)}
        grid = make_grid([upscale(im, 64) for im in (vis.images.clamp(0, 1) * 255).round().to(torch.uint8)
                          .permute(0, 2, 3, 1).numpy()], nrow=8, pad=2, fill=255)
        paths.append(artifacts.save_image(layout.layer_figure("visualize", layer), grid))
    paths.append(artifacts.write_json(layout.visualize_numbers, numbers))
    return paths


def pictures(layout: Layout) -> list[Path]:
    """Every unit's picture the run has, layer by layer (natural order), units in order."""
    found = layout.visualizations()
    return [found[layer][u] for layer in sorted(found, key=natural_key) for u in sorted(found[layer])]


def summary(result: VisualizeResult) -> str:
    return "; ".join(f"{layer}: {len(v.units)} units, strongest activation {v.activations.min():.3g}.."
                     f"{v.activations.max():.3g} after {result.steps} steps ({v.seconds:.1f} s)"
                     for layer, v in result.layers.items())


def unit_panel(layout: Layout, layer: str, unit: int, query=None) -> Panel | None:
    """The image optimised to excite the unit, where it was visualised."""
    path = layout.visualization(layer, unit)
    if not path.is_file():
        return None
    return Panel([Picture(path, f"optimised image of {layer} unit {unit}", "Optimised.",
                          "An image optimised to excite the unit (Olah et al. 2017): what maximises it, against what "
                          "it responds to in the data.", id="visual-img", width=256)])


register(Analysis(
    "visualize", "visualize", "Olah et al. 2017", "Images optimised to excite each unit",
    "Not in the paper: per unit, the image optimised to excite it most (Adam on a decorrelated Fourier "
    "parameterisation, jittered, scaled and rotated at every step, as Lucid does). Fig. 2 shows what excites "
    "a unit among the data's images; this asks the model itself.",
    files=lambda layout: (list(layout.layer_figures("visualize").values()), []), compute=compute,
    write=write_visualize,
    help={"layers": LAYERS_HELP + " [conv1..conv5, or the model's stages]",
          "units": "Units per layer to visualise (a seeded subset); 0 = all.",
          "objective": "neuron: the unit at the centre of its map (compares with its strongest activation "
                       "in the data); channel: its mean over the map (a texture).",
          "steps": "Optimisation steps (Adam, lr 0.05), all of a layer's units in one batch.",
          "seed": "Seed of the unit subset, the starting images and the random transforms."},
    summary=summary, unit_panel=unit_panel))


__all__ = ["VisualizeResult", "Visualization", "color_matrix", "compute", "init_spectrum", "layer_output", "pictures",
           "random_transform", "spectrum_scale", "spectrum_to_image", "summary", "visualize_units",
           "write_visualize"]
