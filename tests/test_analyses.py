"""Every registered analysis on a tiny attached run (a built-in net attached to a folder of the embedded data's
images, with a parts file and epoch checkpoints of its own): what each one writes holds the numbers it
computed. A new analysis without a check here fails the first test."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import TINY_ARGS
from PIL import Image

import convscope as cs
from convscope import analyses
from convscope.layout import Layout


@pytest.fixture(scope="module")
def tiny(tiny_files, tmp_path_factory):
    """A zfnet_small (narrow, untrained, seeded) attached to the tiny folder of synthetic images."""
    root = tmp_path_factory.mktemp("tiny")
    for name in ("images", "masks", "parts.json", "epochs", "concepts"):
        (root / name).symlink_to(tiny_files / name)
    run = cs.attach("zfnet_small", "folder", root / "run", data_root=root / "images", model_args=TINY_ARGS)
    assert run.image_size == 64 and run.classes == ["car", "face", "house"]
    return root


OPTIONS = {
    "scan": {"k": 3, "units": 3},
    "evolution": {"units": 2, "n_images": 12, "checkpoints": "epochs"},
    "invariance": {"n": 2},
    "filters": {"n_images": 4},
    "occlusion": {"n": 2},
    "correspondence": {"parts_json": "parts.json", "draws": 2},
    "transfer": {"target": "run", "shots": (1,), "folds": 2, "scratch_steps": 2},
    "probe-layers": {"target": "run", "n_per_class": 2},
    "pointing": {"n": 6, "masks": "masks"},
    "sanity": {"n": 2},
    "visualize": {"units": 2, "steps": 8},
    "dissect": {"masks": "concepts", "quantile": 0.05},
}


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def check_scan(result, layout):
    from helpers import assert_picture

    from convscope.topk import load_topk
    from convscope.views import layer_grid, patch_grid, projection_grid

    saved, meta = load_topk(layout.topk)
    assert meta["split"] == "all" and saved.seen == 30 and saved.layers == result.topk.layers
    for layer, units in result.units.items():
        assert torch.equal(saved.values[layer], result.topk.values[layer])
        assert torch.equal(saved.images[layer], result.topk.images[layer])
        views = result.draw(layer, units, result.rule)
        assert (png(layout.layer_figure("fig2", layer)) == layer_grid(views, 4)).all()  # 3 units: all in the panel
        for u, unit in enumerate(units.tolist()):
            assert_picture(layout.unit(layer, unit), projection_grid(views, u))
            assert_picture(layout.unit_patches(layer, unit), patch_grid(views, u))
            assert png(layout.unit_thumb(layer, unit)).shape == (48, 48, 3)


def check_evolution(result, layout):
    from convscope.evolution import evolution_grid

    saved = json.loads(layout.figure("fig4", ".json").read_text())
    for layer, ev in result.layers.items():
        assert ev.epochs == [1, 3] and saved[layer]["epochs"] == [1, 3]
        assert saved[layer]["images"] == ev.images.tolist() and saved[layer]["values"] == ev.values.tolist()
        assert (png(layout.layer_figure("fig4", layer)) == evolution_grid(ev)).all()


def check_invariance(result, layout):
    saved = json.loads(layout.figure("fig5", ".json").read_text())
    assert saved["layers"] == list(result.layers) == ["conv1", "fc7"]
    for name, curves in result.curves.items():
        assert saved["curves"][name]["prob"] == curves.prob.tolist()
        assert saved["curves"][name]["distance"]["fc7"] == curves.distance["fc7"].tolist()


def check_filters(result, layout):
    saved = json.loads(layout.figure("fig6", ".json").read_text())
    (label, diagnosis), = result.diagnoses.items()
    assert saved[label]["dominance"] == pytest.approx(diagnosis.stats.dominance)
    assert saved[label]["aliasing"] == pytest.approx(diagnosis.aliasing.fraction)
    assert (png(layout.figure("conv1_0")) == diagnosis.grid).all()


def check_occlusion(result, layout):
    saved = json.loads(layout.figure("fig7", ".json").read_text())["images"]
    for entry, r in zip(saved, result.images, strict=True):
        assert entry["prob"] == r.prob.tolist() and entry["activation"] == r.activation.tolist()
        assert entry["label"] == result.classes[r.label] and entry["channel"] == r.channel


def check_correspondence(result, layout):
    from convscope.correspondence import correspondence_table

    saved = json.loads(layout.figure("table1", ".json").read_text())
    assert saved["mean"] == result.mean and saved["regions"] == ["left_eye", "right_eye", "nose", "random"]
    assert layout.figure("table1", ".txt").read_text() == correspondence_table(result)


def check_transfer(result, layout):
    from convscope.transfer import transfer_table

    saved = json.loads(layout.transfer("run", ".json").read_text())
    for name, acc in result.pretrained.items():
        assert saved["pretrained"][name]["folds"] == acc.tolist()
    assert saved["scratch"]["folds"] == result.scratch.tolist() and saved["features"] == result.features
    assert layout.transfer("run", ".md").read_text() == transfer_table(result)


def check_probes(result, layout):
    from convscope.probes import probe_table

    saved = json.loads(layout.probe(".json").read_text())
    assert saved["accuracy"] == result.accuracy and saved["layers"] == result.layers
    assert layout.probe(".md").read_text() == probe_table(result)


def check_visualize(result, layout):
    from convscope.imaging import tensor_to_pil

    saved = json.loads(layout.visualize_numbers.read_text())
    assert sorted(layout.visualizations()) == sorted(saved) == sorted(result.layers)
    for layer, vis in result.layers.items():
        assert saved[layer]["units"] == vis.units.tolist() and saved[layer]["activations"] == vis.activations.tolist()
        assert saved[layer]["seed"] == 0 and saved[layer]["steps"] == 8
        for unit, image in zip(vis.units.tolist(), vis.images):
            assert (png(layout.visualization(layer, unit)) == np.asarray(tensor_to_pil(image))).all()


def check_pointing(result, layout):
    from convscope.pointing import pointing_table

    saved = json.loads(layout.figure("pointing", ".json").read_text())
    assert saved["accuracy"] == json.loads(json.dumps(result.table())) and len(saved["labels"]) == 6
    assert saved["hits"]["deconvnet"]["true"] == result.hits["deconvnet"]["true"].tolist()
    assert layout.figure("pointing", ".md").read_text() == pointing_table(result)


def check_sanity(result, layout):
    from convscope.sanity import sanity_figure, sanity_table

    saved = json.loads(layout.figure("sanity", ".json").read_text())
    assert saved["layers"] == result.layers and saved["mean"] == json.loads(json.dumps(result.table()))
    assert saved["per_image"]["guided"]["spearman_abs"] == result.spearman_abs["guided"].tolist()
    assert layout.figure("sanity", ".md").read_text() == sanity_table(result)
    assert png(layout.figure("sanity")).shape[1] > 400 and len(sanity_figure(result).axes) == 4 * 11


def check_dissect(result, layout):
    from convscope.dissect import dissect_table

    saved = json.loads(layout.figure("dissect", ".json").read_text())
    assert list(saved["layers"]) == list(result.layers) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    for layer in result.layers:
        assert saved["layers"][layer]["units"] == result.units(layer)
        assert saved["layers"][layer]["summary"] == result.summary(layer)
    assert layout.figure("dissect", ".md").read_text() == dissect_table(result)
    assert saved["quantile"] == 0.05 and saved["n_images"] == 30 and len(saved["concepts"]) == len(result.names)


CHECKS = {"pointing": check_pointing, "sanity": check_sanity, "dissect": check_dissect,
          "scan": check_scan, "evolution": check_evolution, "invariance": check_invariance,
          "filters": check_filters, "occlusion": check_occlusion, "correspondence": check_correspondence,
          "transfer": check_transfer, "probe-layers": check_probes, "visualize": check_visualize}
RUNNABLE = [a for a in analyses.REGISTRY if a.compute is not None]


def test_every_registered_analysis_is_checked():
    assert sorted(a.name for a in RUNNABLE) == sorted(CHECKS) == sorted(OPTIONS)
    # each analysis's files are found by the report and the viewer where its writer puts them
    assert len({a.key for a in analyses.REGISTRY}) == len(analyses.REGISTRY)


def test_each_analysis_registers_itself_once_and_in_the_papers_order():
    registered = {a.key: a for a in analyses.REGISTRY}
    # declared beside its code: the module that defines compute (or, for Table 3, its files) registers it
    assert registered["fig7"].compute.__module__ == "convscope.occlusion"
    assert [a.ref for a in analyses.REGISTRY][:10] == [
        "Fig. 2", "Fig. 4", "Fig. 5", "Fig. 6", "Fig. 7", "Table 1", "Table 3", "Tables 4-5, Fig. 9", "Table 7",
        "Bau et al. 2017"]
    before = list(analyses.REGISTRY)
    twin = registered["fig7"]
    for name, key in ((twin.name, "fig7b"), ("occlusion2", twin.key), ("fig2", "other")):
        with pytest.raises(ValueError, match="is taken by the analysis"):
            analyses.register(type(twin)(name, key, "Fig. 7", "t", "c", files=twin.files))
    assert analyses.REGISTRY == before  # nothing half-registered
    assert dict(registered["table3"].paper)["Removed layers 3,4,6,7"] == "71.1 / 71.3 / 50.1"


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", [None, pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("analysis", RUNNABLE, ids=[a.name for a in RUNNABLE])
def test_analysis_writes_what_it_computed(analysis, device, tiny):
    """On the CPU, and (where there is one) with the model on a GPU (``--device cuda``)."""
    run = cs.open_run(tiny / "run", device=device)
    options = {k: str(tiny / v) if k in ("checkpoints", "parts_json", "masks") else v
               for k, v in OPTIONS[analysis.name].items()}
    result, paths = analysis.run(run, **options)
    assert paths and all(p.is_file() and p.is_relative_to(run.path) for p in paths)
    CHECKS[analysis.name](result, run.layout)
    images, texts = analysis.files(run.layout)  # what the report and the viewer show of it
    assert set(images + texts) <= set(paths) and images + texts


def test_the_report_and_the_viewer_show_every_analysis(tiny):
    """Every analysis is a section of the report and a figure page of the viewer (each is run here where the test
    above has not run it: alone, or first in a shuffled order)."""
    from starlette.testclient import TestClient

    from convscope.report import collect, render_report
    from convscope.viewer import make_app

    for analysis in RUNNABLE:
        if not any(analysis.files(Layout(tiny / "run"))):
            options = {k: str(tiny / v) if k in ("checkpoints", "parts_json", "masks") else v
                       for k, v in OPTIONS[analysis.name].items()}
            analysis.run(cs.open_run(tiny / "run"), **options)
    context = collect(tiny / "run")
    assert {s["entry"].key for s in context["sections"]} == {a.key for a in RUNNABLE}
    assert [m["title"] for m in context["missing"]] == ["Ablation of the architecture"]
    # every table an HTML table, none preformatted text (before: the probes, pointing, sanity, Table 1 and transfer
    # tables were markdown inside <pre>, the pointing game's wider than the page)
    html = render_report(tiny / "run")
    texts = [t for s in context["sections"] for t in s["texts"]]
    assert len(texts) >= 5 and html.count('<table class="text-table"') == sum(
        len([b for b in t["blocks"] if not isinstance(b, str)]) for t in texts) >= len(texts)
    assert not [pre for pre in re.findall(r"<pre.*?</pre>", html, re.S) if "|" in pre or "---" in pre]
    assert '<th class="paper-col num">TorchRay VOC07 (VGG-16): all</th>' in html  # the paper's (a peer's) marked
    assert '<td class="paper-col num">69.6</td>' in html
    client = TestClient(make_app(tiny / "run"), base_url="http://127.0.0.1")
    for a in RUNNABLE:
        url = "/layer/conv1" if a.per_layer else f"/figures/{a.key}"
        page = client.get(url)
        assert page.status_code == 200, url
        assert "<pre" not in page.text, url
        for path in a.files(Layout(tiny / "run"))[0]:
            if a.per_layer and "conv1" not in path.name:
                continue
            assert f'src="/files/{path.relative_to(tiny / "run").as_posix()}"' in page.text, (url, path)


def test_a_new_per_unit_analysis_needs_no_edit_outside_its_own_module(tiny_files, tmp_path, request):
    """What the coming per-unit analyses (concept labels) rely on: one registration, and the command line, the
    report, the viewer's unit pages and the findings table take it up. The toy analysis here: each conv1 unit's
    mean activation over the first images, a bar picture per unit, and a claim that it is positive."""
    from click.testing import CliRunner
    from starlette.testclient import TestClient

    from convscope import artifacts, cli
    from convscope.findings import finding, mean_contrast
    from convscope.forward import run_to
    from convscope.panels import Counts, Panel, Picture, UnitBadge
    from convscope.report import render_report
    from convscope.viewer import make_app

    before = list(analyses.REGISTRY)
    request.addfinalizer(lambda: analyses.REGISTRY.__setitem__(slice(None), before))  # the toy leaves with the test
    for name in ("images", "masks", "parts.json", "epochs"):
        (tmp_path / name).symlink_to(tiny_files / name)
    run = cs.attach("zfnet_small", "folder", tmp_path / "run", data_root=tmp_path / "images", model_args=TINY_ARGS)

    def compute(run, n: int = 4):
        x = run.split("all").batch(torch.arange(n))[0]
        with torch.no_grad():
            return run_to(run.model.eval(), run.model.features.conv1, x).relu().mean((0, 2, 3))

    def write(means, layout):
        paths = [artifacts.write_json(layout.figure("toymeans", ".json"), means.tolist())]
        for u, m in enumerate(means.tolist()):
            bar = np.zeros((8, 64, 3), np.uint8)
            bar[:, : max(1, int(64 * m / means.max().item()))] = 255
            paths.append(artifacts.save_image(layout.figures / "toymeans" / "conv1" / f"unit_{u:04d}.png", bar))
        return paths

    def units(layout):
        return Layout.unit_files(layout.figures / "toymeans")

    def panel(layout, layer, unit, query):
        means = artifacts.read_json(layout.figure("toymeans", ".json"))
        path = units(layout).get(layer, {}).get(unit)
        if path is None or not isinstance(means, list):
            return None
        return Panel([Picture(path, f"toy bar {unit}", "Toy.", f"mean activation {means[unit]:.4f}", id="toy-bar"),
                      Counts("toy counts:", (("mean x 1000", round(1000 * means[unit])),))])

    toy = analyses.register(analyses.Analysis(
        "toy-means", "toymeans", "Toy", "Mean activation per unit", "A bar per unit.",
        files=lambda layout: (analyses.existing(layout.figure("toymeans")), analyses.existing(
            layout.figure("toymeans", ".json"))),
        compute=compute, write=lambda means, layout: write(means, layout), help={"n": "Images."},
        findings=lambda means: [finding("toy.positive", "conv1's mean activation is positive", "toy", "toymeans",
                                        mean_contrast(means.tolist()), "its mean", "none", f"{means.mean():.3f}")],
        units=units, unit_panel=panel,
        unit_badges=lambda layout, layer: {u: UnitBadge(f"toy {u}", "toy", u) for u in units(layout).get(layer, {})}
        or None))
    # the command line: generated from the entry, its option from compute's keyword
    result = CliRunner().invoke(cli.main, ["toy-means", str(run.path), "--n", "3"], obj={},
                                standalone_mode=False, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    means = compute(run, 3)
    assert artifacts.read_json(run.layout.figure("toymeans", ".json")) == pytest.approx(means.tolist())
    # the findings table and the report
    html = render_report(run.path)
    assert "conv1&#39;s mean activation is positive" in html and "holds" in html
    # the viewer: the layer is listed, the unit page shows the toy's panel, its badges sort the layer
    client = TestClient(make_app(run.path), base_url="http://127.0.0.1")
    assert 'href="/layer/conv1"' in client.get("/").text
    page = client.get("/layer/conv1/unit/2").text
    assert 'id="toy-bar" src="/files/figures/toymeans/conv1/unit_0002.png"' in page
    assert f"mean activation {means[2].item():.4f}" in page
    assert f"mean x 1000 <b>{round(1000 * means[2].item())}</b>" in page
    order = [int(u) for u in re.findall(r'id="u(\d+)"', client.get("/layer/conv1?sort=toymeans").text)]
    assert order == sorted(order, reverse=True) and len(order) == means.numel()  # the badges' order
    assert analyses.get("toymeans") is toy
    report = render_report(run.path)  # its section, with its text file
    assert "Mean activation per unit" in report and "figures/toymeans.json" in report
