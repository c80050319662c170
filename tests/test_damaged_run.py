"""The report and the viewer on a damaged run: they show what they can, name each damaged file with the command
that writes it again (and that command works), and never answer 500."""

from __future__ import annotations

import json
import shlex

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from convscope.analyses import get
from convscope.checkpoint import save_weights
from convscope.cli import main
from convscope.config import TrainConfig
from convscope.models import create_model
from convscope.report import render_report
from convscope.run import open_run
from convscope.train import train
from convscope.viewer import make_app

TINY = dict(model="zfnet_small", data="synthetic", n_train=64, n_val=32, n_test=32, epochs=2, batch_size=32,
            model_options={"widths": [8, 8, 8, 8, 8], "fc": [16, 16]})


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**TINY), run, progress=False)
    get("occlusion").run(open_run(run), n=1)
    return run


def damaged(html: str) -> str:
    return html.split('id="damaged"')[1].split("</div>")[0] if 'id="damaged"' in html else ""


def advised(html: str, file: str) -> list[str]:
    """The command the report gives for ``file``, as arguments."""
    line = next(li for li in damaged(html).split("<li>") if f"<code>{file}</code>" in li)
    return shlex.split(line.split("<code>")[2].split("</code>")[0])


@pytest.mark.parametrize("file, content, problem", [
    ("metrics.json", '[{"epoch": 1, "lr": 0.0', "not valid JSON"),  # truncated
    ("metrics.json", '[{"epoch": "one"}]', "not of the shape convscope writes"),
    ("test.json", '{"top1_err": "low"}', "not of the shape convscope writes"),
    ("test.json", "[]", "not of the shape convscope writes"),
])
def test_a_damaged_training_record_is_named_and_the_advised_command_rebuilds_it(run, file, content, problem):
    """Before: a truncated metrics.json was called missing and the report advised a command that then refused
    to run; a test.json of the wrong shape crashed the report and made the viewer answer 500."""
    good = json.loads((run / file).read_text())
    (run / file).write_text(content)
    html = render_report(run)
    assert f"<code>{file}</code> is {problem}" in damaged(html)
    index = TestClient(make_app(run), base_url="http://127.0.0.1").get("/")
    assert index.status_code == 200 and f"<code>{file}</code> is {problem}" in index.text
    command = advised(html, file)
    assert command[:2] == ["convscope", "train"]
    r = CliRunner().invoke(main, command[1:])
    assert r.exit_code == 0, r.output
    rebuilt = json.loads((run / file).read_text())
    pairs = list(zip(rebuilt, good)) if isinstance(good, list) else [(rebuilt, good)]
    assert len(pairs) == (len(good) if isinstance(good, list) else 1) == (len(rebuilt) if isinstance(good, list) else 1)
    for new, old in pairs:  # approx per value: newer pytest compares no nested structures
        assert new.keys() == old.keys() and all(new[k] == pytest.approx(old[k]) for k in old)
    assert damaged(render_report(run)) == ""


def test_a_deleted_or_damaged_figure_is_named_not_silently_absent(run):
    (run / "figures" / "fig7.png").unlink()
    html = render_report(run)
    assert f"<code>figures/fig7.png</code> is missing &mdash; <code>convscope occlusion {run}</code>" in damaged(html)
    (run / "figures" / "fig7.png").write_bytes(b"<html>not a picture</html>")
    html = render_report(run)
    assert "<code>figures/fig7.png</code> is not a PNG image" in damaged(html)
    assert 'id="fig7"' not in html  # nothing broken is shown
    r = CliRunner().invoke(main, advised(html, "figures/fig7.png")[1:])
    assert r.exit_code == 0 and damaged(render_report(run)) == ""


def test_the_viewer_never_answers_500(run):
    client = TestClient(make_app(run), base_url="http://127.0.0.1", raise_server_exceptions=False)
    huge = "9" * 5000
    page = client.get(f"/layer/conv5/unit/{huge}")
    assert page.status_code == 404 and "is not a unit number" in page.text and "Traceback" not in page.text
    assert client.get("/layer/conv5/unit/-3").status_code == 404
    (run / "figures" / "fig4.json").write_text('{"conv5": "not a table"}')
    for url in ("/", "/figures", "/figures/fig7", "/figures/nothing", "/layer/nothing/unit/1"):
        assert client.get(url).status_code in (200, 404), url
    assert "<code>figures/fig4.json</code> is not of the shape convscope writes" in client.get("/").text
    (run / "scan").mkdir()
    (run / "scan" / "topk.safetensors").write_bytes(b"\0" * 100)
    assert "<code>scan/topk.safetensors</code> is not readable" in client.get("/").text
    assert client.head("/").status_code == 200 and client.head("/figures/fig7").status_code == 200
    _, paths = get("scan").run(open_run(run), layers=["conv5"], units=1)
    unit = int(next(p for p in paths if "units" in p.parts).stem.split("_")[1])
    assert client.head(f"/layer/conv5/unit/{unit}").status_code == 200  # before: 404
    assert client.get(f"/layer/conv5/unit/{unit}").status_code == 200


def test_class_names_that_are_not_utf8_show_escaped(tmp_path):
    """Before: a class name the OS kept as surrogates (a folder named in Latin-1) crashed the report and the
    viewer."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "zfnet_small", "data": "folder"}))
    save_weights(run / "model.safetensors", create_model("zfnet_small", 2), {"model": "zfnet_small"}, 1, 2,
                 ["caf\udce9", "dog"])
    html = render_report(run)
    assert "caf\\udce9" in html
    page = TestClient(make_app(run), base_url="http://127.0.0.1").get("/")
    assert page.status_code == 200 and "caf\\udce9" in page.text


def test_damaged_final_weights_are_named_not_replaced_by_an_older_checkpoint_in_silence(run):
    """Before: the report summarised checkpoints/epoch_002 and said nothing of the damaged model.safetensors."""
    (run / "model.safetensors").write_bytes(b"\x00" * 64)
    html = render_report(run)
    assert "<code>model.safetensors</code> is not loadable" in damaged(html)
    assert "checkpoints/epoch_002.safetensors" in html  # what the summary shows instead, named


def test_a_damaged_manifest_is_named_as_it_turns_off_the_check_for_missing_figures(run):
    (run / "manifest.json").write_text('{"fig7": ["figures/fig7.png"')
    (run / "figures" / "fig7.png").unlink()
    html = render_report(run)
    assert "<code>manifest.json</code> is not valid JSON" in damaged(html)


def test_a_damaged_findings_file_is_named(run):
    (run / "findings.json").write_text('{"findings": [')
    html = render_report(run)
    assert "<code>findings.json</code> is not readable" in damaged(html)
    assert 'id="findings"' not in html
