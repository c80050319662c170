"""`convscope demo --quick`: the whole pipeline end to end on the embedded data (CI runs it)."""

import json
import re

import pytest
from click.testing import CliRunner
from PIL import Image

from convscope import analyses
from convscope.cli import main
from convscope.run import open_run

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_step_and_resumes(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert re.search(r"\[demo\] total: \d+ s \(\d+\.\d min\); peak memory \d+\.\d\d GB\n", r.output)
    # the main run's report comes first, before the comparisons are trained
    first = r.output.index("[demo] the main run's report is ready after")
    assert r.output.index("[demo] probes (Table 7): ") < first
    assert first < r.output.index("[demo] train alexnet_small (Fig. 6) ...")
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {
        "train zfnet_small", "train alexnet_small (Fig. 6)", "train zfnet_small without renormalisation (Fig. 6)",
        "scan and Fig. 2", "dissection (Bau et al.)", "evolution (Fig. 4)", "feature visualisation (Olah et al.)",
        "filters (Fig. 6)", "dissection compared: epochs, AlexNet, no renorm (Bau et al.)",
        "occlusion (Fig. 7)", "pointing game (TorchRay)", "sanity check (Adebayo et al.)", "invariance (Fig. 5)",
        "correspondence (Table 1)", "train zfnet_small on parts that correspond (Table 1)",
        "correspondence on parts that correspond (Table 1)", "probes (Table 7)",
        "transfer to digits (Tables 4-5, Fig. 9)",
        "pretrain zfnet_small on six classes (transfer)", "transfer to held-out classes (Tables 4-5, Fig. 9)",
        "ablation on pairs (Table 3)", "report", "filters of the main run (Fig. 6)", "first report: the main run",
    }
    total = float(re.search(r"\[demo\] total: (\d+) s", r.output).group(1))
    assert timings["train zfnet_small"] > 1 and sum(timings.values()) <= total + 1  # the steps' times add up
    peak = re.search(r"peak memory (\d+\.\d\d) GB", r.output)
    assert peak and float(peak.group(1)) > 0.1  # this process's peak, which holds the earlier tests' too
    # every claim tested has its verdict, in findings.json, the report and the demo's last words
    findings = json.loads((out / "findings.json").read_text())["findings"]
    # (the quick demo classifies too few images right for Fig. 7's claim, and trains two of Table 3's variants)
    assert {f["analysis"] for f in findings} == {"fig2", "fig5", "fig5_render", "fig6", "table1", "table1_parts",
                                                 "table7", "pointing", "sanity", "transfer_digits", "transfer_heldout",
                                                 "dissect"}
    for f in findings:
        assert {"claim", "source", "measured", "interval", "verdict", "analysis"} <= set(f)
        assert f["verdict"] in ("holds", "not shown", "reversed")
    assert r.output.rindex("| claim | source | paper | this run |") > r.output.index("report: ")  # it ends so
    html = (out / "report.html").read_text()
    assert 'id="findings"' in html and html.count("<tr><td>") >= len(findings)
    figures = out / "figures"
    for name in ("fig2_conv1.png", "fig2_conv5.png", "fig4_conv3.png", "fig6.png", "fig7.png", "fig5.png",
                 "fig5_render.png"):
        with Image.open(figures / name) as im:
            assert min(im.size) > 50, name
    compared = json.loads((figures / "dissect_compare.json").read_text())["models"]
    assert [m["name"] for m in compared] == ["epoch 1", "epoch 2", "alexnet_small (10 ep)", "no renorm (30 ep)"]
    assert all(sorted(m["layers"]) == ["conv1", "conv2", "conv3", "conv4", "conv5"] for m in compared)
    assert "dissect_compare.png" in html and "epoch 2" in html
    fig6 = json.loads((figures / "fig6.json").read_text())
    assert sorted(fig6) == ["alexnet_small (2 ep)", "zfnet_small (2 ep)", "zfnet_small no renorm (2 ep)"]
    assert all(0 <= v["mid_fraction"] <= 1 for v in fig6.values())
    table = json.loads((figures / "table1.json").read_text())
    assert set(table["regions"]) == {"left_eye", "right_eye", "nose", "random"}
    assert 0 < table["mean"]["random"]["conv5"] < 1
    parts = json.loads((figures / "table1_parts.json").read_text())
    assert parts["heading"].startswith("On synthetic-parts") and set(parts["regions"]) == set(table["regions"])
    assert json.loads((out / "compare" / "zfnet_small-parts" / "config.json").read_text())["data"] == "synthetic-parts"
    assert (out / "compare" / "alexnet_small" / "model.safetensors").is_file()
    probes = json.loads((out / "probes" / "probes.json").read_text())["accuracy"]
    assert sorted(probes) == ["softmax", "svm"] and all(0 <= v <= 1 for v in probes["svm"].values())
    seen = json.loads((out / "compare" / "zfnet_small-six" / "config.json").read_text())["classes"]
    heldout = json.loads((out / "transfer" / "heldout" / "transfer.json").read_text())["classes"]
    assert len(seen) == len(heldout) == 6 and not set(seen) & set(heldout)
    assert (out / "transfer" / "digits").is_dir() and (out / "ablation" / "no_conv34" / "model.safetensors").is_file()
    assert json.loads((out / "ablation" / "no_conv34" / "config.json").read_text())["data"] == "pairs"
    assert json.loads((out / "compare" / "zfnet_small-norenorm" / "config.json").read_text())["renorm"] is False
    # Fig. 6 again, now that compare/ also holds the runs on other data (parts, six classes): still like for like
    analyses.get("filters").run(open_run(out))
    assert sorted(json.loads((figures / "fig6.json").read_text())) == sorted(fig6)
    # a second run reuses the trained models instead of retraining them
    state = out / "state.pt"
    mtime = state.stat().st_mtime_ns
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0 and state.stat().st_mtime_ns == mtime
    assert "run directory:" in r.output
    assert "[demo] scan and Fig. 2: done before" in r.output and "[demo] report ..." in r.output  # not recomputed
    assert set(json.loads((out / "timings.json").read_text())) == set(timings)
    html = (out / "report.html").read_text()
    from convscope.report import REGISTRY

    for entry in REGISTRY:  # every figure and table of the paper is in the report, none listed as missing
        assert f'id="{entry.key}"' in html, entry.key
    assert 'id="missing"' not in html and 'id="pending"' not in html and "38.4" in html
    assert (out / "report.html").stat().st_size < 2_000_000 and "data:image" not in html  # figures linked, not inlined

