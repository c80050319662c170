"""Fig. 2 on a trained zfnet_small and the embedded data's ground truth: what the paper shows, as numbers.

Measured over training seeds 0-2 (scripts/seeds.py; the demo's main run, 30 epochs, 6.1-9.5% test error): conv5's
top-9 images share a class 0.61-0.67 of the time (chance 0.083), rising with depth (conv1 0.14-0.16, conv3
0.40-0.45); 0.61-0.63 of conv5's projection energy lies on the object, whose mask covers 0.11-0.12 of the image.
The untrained control: 0.10 at every layer, and 0.35-0.37 of the energy on the object (edges draw it there too).
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import convscope as cs
from convscope.analyses import get
from convscope.run import open_run
from convscope.topk import load_topk, scan
from convscope.units import class_agreement, mask_energy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def val_scan(trained_run):
    data = trained_run.split("val")
    return data, scan(trained_run.model, data, ["conv1", "conv3", "conv5"], k=9, progress=False)


@pytest.fixture(scope="module")
def control_scan(untrained_run):
    data = untrained_run.split("val")
    return data, scan(untrained_run.model, data, ["conv1", "conv3", "conv5"], k=9, progress=False)


def agreement(data, topk, measured, prefix):
    agree = {layer: class_agreement(topk, data.labels, layer) for layer in topk.layers}
    for layer, (value, _) in agree.items():
        measured(f"{prefix}fig2.agreement.{layer}", value)
    return {layer: value for layer, (value, _) in agree.items()}, agree["conv5"][1]


def test_top9_images_of_upper_units_share_a_class(val_scan, control_scan, measured):
    agree, chance = agreement(*val_scan, measured, "")
    assert chance == pytest.approx(1 / 12, abs=0.01)
    assert agree["conv5"] > 4 * chance
    assert agree["conv1"] < agree["conv3"] < agree["conv5"]
    control, _ = agreement(*control_scan, measured, "control.")
    assert not control["conv5"] > 4 * chance


def energy_on_object(run, data, topk):
    idx = topk.images["conv5"][:, :3].reshape(-1)  # the three strongest images of every unit
    channels = torch.arange(topk.values["conv5"].shape[0]).repeat_interleave(3)
    proj = cs.Projector(run.model).project(data.batch(idx)[0], "conv5", channel=channels)
    return mask_energy(proj, data.truth.masks[idx])


def test_projection_energy_lies_on_the_object(trained_run, untrained_run, val_scan, control_scan, measured):
    inside, share = energy_on_object(trained_run, *val_scan)
    measured("fig2.energy_on_object", inside)
    measured("fig2.object_share", share)
    assert share < 0.2
    assert inside > 4 * share
    inside, share = energy_on_object(untrained_run, *control_scan)
    measured("control.fig2.energy_on_object", inside)
    assert not inside > 4 * share  # an untrained net's projections lie on the object too, but less


def test_scan_command_writes_the_figures(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.path, run_dir, ignore=shutil.ignore_patterns("scan", "figures"))
    _, paths = get("scan").run(open_run(run_dir), layers=["conv2", "conv5"], k=9, split="test", units=4)
    names = sorted(p.relative_to(run_dir).as_posix() for p in paths)
    assert names[:2] == ["figures/fig2_conv2.png", "figures/fig2_conv5.png"]
    assert len([n for n in names if n.startswith("figures/units/conv5/unit_")]) == 4
    assert len([n for n in names if n.startswith("figures/units/conv5/thumb/unit_")]) == 4
    assert not (run_dir / "scan" / "state.pt").exists()
    topk, info = load_topk(run_dir / "scan" / "topk.safetensors")
    assert info["split"] == "test" and topk.seen == 1000 and topk.k == 9
    with Image.open(run_dir / "figures" / "fig2_conv5.png") as im:
        assert im.size[0] > 400 and len(np.unique(np.asarray(im.convert("L")))) > 50  # a real picture, not flat
