"""The static report (convscope.report): every registered artifact a run has appears with its caption and the
paper's reference and numbers; missing ones are listed with the command that makes them; run text is escaped."""

import json
import re
import shutil
from html import unescape
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

import pytest
from helpers import ODD, make_fake_run
from markupsafe import escape
from PIL import Image

from convscope import analyses
from convscope.errors import ConvscopeError
from convscope.report import REGISTRY, build_report, render_report


@pytest.fixture
def fake_run(tmp_path):
    return make_fake_run(tmp_path / "run")


def shown_files(report: Path) -> list[Path]:
    """The file each ``<img>`` of the report shows, found as a browser finds it (the src joined to the page's
    ``file://`` URL, then percent-decoded); each image also links to its file, for the full size."""
    html = report.read_text()
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert re.findall(r'<a href="([^"]*)"><img', html) == srcs
    return [Path(url2pathname(urlsplit(urljoin(report.absolute().as_uri(), unescape(s))).path)) for s in srcs]


PRESENT = {"fig2", "fig4", "fig6", "fig7", "table1", "table7"}
ABSENT = {"fig5": "convscope invariance {run}", "table3": "convscope ablate --config pairs --out {run}/ablation",
          "transfer": "convscope transfer {run}"}


def test_report_shows_every_present_artifact_with_caption_and_paper_reference(fake_run):
    path = build_report(fake_run)
    assert path == fake_run / "report.html"
    html = path.read_text()
    for entry in REGISTRY:
        if entry.key in PRESENT:
            assert f'id="{entry.key}"' in html, entry.key
            assert f"<b>{escape(entry.ref)}.</b> {escape(entry.caption)}" in html, entry.key
    # images linked, not inlined: 2 Fig. 2 grids, Fig. 4, Fig. 6, Fig. 7, Table 7's plot, the training curve
    assert "data:image" not in html and len(html) < 40_000
    assert shown_files(path) == [fake_run / "figures" / f for f in (
        "training_curve.png", "fig2_conv1.png", "fig2_conv5.png", "fig4_conv5.png", "fig6.png", "fig7.png")] + [
        fake_run / "probes" / "probes.png"]
    assert '<td>left_eye</td><td class="num">0.0612 +- 0.0040</td>' in html
    assert '<td>conv5</td><td class="num">77.7</td>' in html
    # the paper's numbers beside the run's
    assert "<td>convscope: this run, test split</td><td class=\"num\">12.3</td>" in html
    assert '<td class="num">4.6</td>' in html  # test top-5
    assert '<td class="num">38.4</td><td class="num">16.5</td>' in html
    assert "paper, Table 2: ZF ensemble of 6 nets, test" in html and ">14.8<" in html
    assert '<td class="num">26.7</td>' in html  # last epoch's val top-1 error, 0.8 / 3
    for what, value in [*analyses.get("table1").paper, *analyses.get("table7").paper]:
        assert f"<td>{what}</td><td class=\"num\">{value}</td>" in html
    assert "0.067 / 0.069 / 0.079" in html and "86.2" in html


def test_report_images_are_files_found_from_the_page_wherever_it_is_written(tmp_path):
    """The page links the run's figures by relative, percent-encoded URLs: from the run (default), from another
    folder (``out=``), from a folder reached through a symlink, and to a run named through one, every image is an
    existing file of the run."""
    run = make_fake_run(tmp_path / ODD)
    expected = sorted([*run.glob("figures/*.png"), run / "figures" / "training_curve.png",
                       run / "probes" / "probes.png"])
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "linked ü").symlink_to(tmp_path / "real" / "deep")
    (tmp_path / "real" / "run link").symlink_to(run)
    for named, out in ((run, None), (run, tmp_path / "elsewhere" / "sub dir" / "r #2.html"),
                       (run, tmp_path / "linked ü" / "r.html"), (tmp_path / "real" / "run link", tmp_path / "r.html")):
        report = build_report(named, out=out)
        assert report == (out or run / "report.html")
        html = report.read_text()
        assert "data:image" not in html and html.count("<img ") == 7 and report.stat().st_size < 40_000
        assert "#1" not in " ".join(re.findall(r'src="([^"]*)"', html))  # encoded as %231
        files = shown_files(report)
        assert len(files) == 7 and all(f.is_file() for f in files), files
        assert sorted(f.resolve() for f in files) == expected
    assert render_report(run) == (run / "report.html").read_text()


def test_report_lists_missing_artifacts_with_their_commands(fake_run):
    html = render_report(fake_run)
    missing = html.split('id="missing"')[1].split("</div>")[0]
    for key, command in ABSENT.items():
        entry = next(e for e in REGISTRY if e.key == key)
        assert f"<code>{command.format(run=fake_run)}</code>" in missing
        assert f'id="{key}"' not in html
        assert entry.ref in missing
    for key in PRESENT:
        assert next(e for e in REGISTRY if e.key == key).title not in missing


def test_report_written_before_the_demo_ends_lists_its_pending_steps_first(fake_run):
    html = render_report(fake_run, pending=["train <b>", "ablation on pairs (Table 3)"])
    banner = html.split('id="pending"')[1].split("</div>")[0]
    assert "The demo is still running" in banner
    assert "<li>train &lt;b&gt;</li>" in banner and "<li>ablation on pairs (Table 3)</li>" in banner
    assert html.index('id="pending"') < html.index('id="missing"')  # above what is not there yet
    assert 'id="pending"' not in render_report(fake_run)


def test_report_model_config_timings_and_curve(fake_run):
    from convscope.models import create_model

    html = build_report(fake_run).read_text()
    n = sum(p.numel() for p in create_model("zfnet_small", num_classes=3).parameters())
    assert f"<b>{n:,}</b> parameters" in html
    assert "<code>features.conv1</code>" in html and "Conv2d" in html
    assert '<td>train</td><td class="num">12.5</td>' in html
    assert '<b>15.5</b>' in html  # total of timings
    curve = fake_run / "figures" / "training_curve.png"
    with Image.open(curve) as im:
        assert im.format == "PNG" and im.width > 300
    assert "3 epochs, 4 s of training" in html


def test_report_escapes_run_text(fake_run):
    html = build_report(fake_run).read_text()
    assert "<li>1: &lt;img src=x onerror=alert(1)&gt;</li>" in html
    assert "<img src=x" not in html
    assert "<li>2: dog &amp; co</li>" in html


def test_report_of_a_bare_run_lists_everything_missing(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "zfnet_small", "data": "synthetic"}))
    html = build_report(run).read_text()
    for command in ("convscope scan", "convscope evolution", f"convscope train --config {run}/config.json --out {run}",
                    "convscope probe-layers"):
        assert command in html
    assert "No weights to summarise" in html
    assert "data:image/png" not in html


@pytest.mark.parametrize("kind", ["empty", "file", "nonexistent"])
def test_report_of_a_non_run_raises(tmp_path, kind):
    target = tmp_path / "x"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("hi")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConvscopeError, match="not a convscope run" if kind == "empty" else "is not a directory"):
        build_report(target)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, in it or beside it


@pytest.mark.slow  # trains the session's run the first time (minutes)
def test_report_of_the_trained_run(trained_run, tmp_path):
    """A real run (trained by the session fixture): its test error and the model's layers appear."""
    run = tmp_path / "real"
    shutil.copytree(trained_run.path, run, ignore=shutil.ignore_patterns("state.pt", "checkpoints"))
    html = build_report(run).read_text()
    test = json.loads((run / "test.json").read_text())
    assert f'<td class="num">{100 * test["top1_err"]:.1f}</td>' in html
    for name in trained_run.classes:
        assert f": {escape(name)}</li>" in html
    assert "<code>features.conv5</code>" in html
    assert "convscope scan" in html  # no scan in the fixture run


def test_a_table_written_as_markdown_reads_back_the_same():
    """The tables the analyses write are read back as the same cells (a ``|`` inside a cell included) for the
    report's HTML; numbers (``12.3``, ``0.06 +- 0.01``, ``1.20 M``, ``-``) are right-aligned, names are not; the
    paper's columns are those that name it; prose around a table stays prose."""
    from convscope.tables import TextTable, blocks

    table = TextTable(("layer", "dim", "ours", "paper", "note"),
                      (("conv1", "96", "44.8 +- 0.8", "-", "a|b"), ("fc7", "4096", "1.20 M", "81.4", "x / y")),
                      "mean per-class accuracy (%)")
    text = "Heading line\n\n" + table.markdown() + "\nafter\n"
    assert blocks(text) == ["Heading line", table, "after"]
    assert [table.numeric(i) for i in range(5)] == [False, True, True, True, False]
    assert table.paper_columns() == {3} and table.paper_rows() == set()
    assert TextTable(("", "x"), (("paper (ZF)", "1"),)).paper_rows() == {0}
    assert TextTable(("x",), (("-",), ("-",))).numeric(0) is False  # dashes alone: no numbers to align
    with pytest.raises(ValueError, match="a row of 1 cells under a header of 2"):
        TextTable(("a", "b"), (("1",),))


def test_per_layer_figures_come_in_the_order_the_forward_pass_reaches_their_layers(fake_run):
    """Before: in natural order, which put an attached ResNet's stem (``relu``) after ``layer1`` .. ``layer4``."""
    from tvnets import ResNet50

    from convscope.layout import Layout
    from convscope.report import _summary, sections

    order = _summary(ResNet50(), "", None, [], ["conv1", "bn1", "relu", "maxpool", "layer1", "avgpool"])["order"]
    assert order["relu"] < order["layer1"] < order["avgpool"]
    labels = lambda found: [im["label"] for s in found if s["entry"].key == "fig2" for im in s["images"]]  # noqa: E731
    assert labels(sections(Layout(fake_run), str)[0]) == ["conv1", "conv5"]  # natural, where no order is known
    assert labels(sections(Layout(fake_run), str, {"conv5": 0, "conv1": 1})[0]) == ["conv5", "conv1"]
    from convscope import create_model

    built_in = create_model("zfnet_small")
    order = _summary(built_in, "", None, [])["order"]  # a paper alias sorts where its module is
    assert order["conv1"] == order[built_in.paper_layers["conv1"]] < order["conv2"]
