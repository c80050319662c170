"""Findings (convscope.findings): the intervals against hand computations, the verdict read off the interval (and
flipped by the numbers, never written by hand), the combination over seeds, and findings.json's round trip."""

import json
import math

import pytest

from convscope.errors import ConvscopeError
from convscope.findings import (
    HOLDS,
    NOT_SHOWN,
    REVERSED,
    Contrast,
    combine,
    difference_contrast,
    finding,
    findings_table,
    mean_contrast,
    paired_contrast,
    proportion_contrast,
    read_findings,
    verdict,
    write_findings,
)

T975_2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom (tables)


def make(key, measured, interval, analysis="table1"):
    return finding(key, f"claim {key}", "Zeiler & Fergus 2014, Table 1", analysis,
                   Contrast(measured, interval, 10, "t interval over 10 paired draws"), "random - part", "0.07 vs 0.1",
                   f"{measured:.2f}")


def test_the_verdict_is_read_off_the_interval():
    assert verdict((0.01, 0.3)) == HOLDS
    assert verdict((-0.3, -0.01)) == REVERSED
    assert verdict((-0.01, 0.3)) == verdict((0.0, 0.3)) == NOT_SHOWN  # zero inside (or on the edge): not shown
    assert verdict((math.nan, 1.0)) == verdict((-math.inf, math.inf)) == NOT_SHOWN


def test_mean_contrast_is_students_t_interval():
    c = mean_contrast([1.0, 2.0, 3.0])  # mean 2, sd 1, sem 1/sqrt(3)
    half = T975_2 / math.sqrt(3)
    assert c.measured == pytest.approx(2.0) and c.n == 3
    assert c.interval == pytest.approx((2 - half, 2 + half))
    assert c.verdict == NOT_SHOWN  # 2 - 2.48 < 0: three values this spread cannot tell
    assert mean_contrast([4.0, 5.0, 6.0]).verdict == HOLDS and mean_contrast([-4.0, -5.0, -6.0]).verdict == REVERSED
    assert mean_contrast([4.0, 5.0, 6.0], null=5.0).interval == pytest.approx((-half, half))
    one = mean_contrast([3.0])
    assert one.interval == (-math.inf, math.inf) and one.verdict == NOT_SHOWN  # one value: no interval, no verdict


def test_paired_contrast_is_the_mean_difference_with_wilcoxon_beside_it():
    a, b = [0.28, 0.27, 0.29, 0.30, 0.28], [0.22, 0.21, 0.23, 0.20, 0.22]
    c = paired_contrast(a, b)
    d = [x - y for x, y in zip(a, b)]
    assert c.measured == pytest.approx(sum(d) / 5) and c.verdict == HOLDS
    assert "5 of 5 positive" in c.method and "Wilcoxon p = 0.062" in c.method  # exact: 2 / 2^5
    assert paired_contrast(b, a).verdict == REVERSED  # the numbers flip the verdict
    with pytest.raises(ConvscopeError, match="differ in number"):
        paired_contrast([1.0, 2.0], [1.0])


def test_difference_contrast_is_welchs_interval():
    c = difference_contrast([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    # means 2 and 3; variances of the means 1/3 and 2.5/5
    assert c.measured == pytest.approx(-1.0)
    se = math.sqrt(1 / 3 + 0.5)
    df = (1 / 3 + 0.5) ** 2 / ((1 / 3) ** 2 / 2 + 0.5 ** 2 / 4)
    from scipy import stats

    assert c.interval == pytest.approx(stats.t.interval(0.95, df, loc=-1.0, scale=se))


def test_proportion_contrast_is_wilsons_interval():
    c = proportion_contrast(57, 60, null=0.11)
    p, n, z = 57 / 60, 60, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert c.measured == pytest.approx(p - 0.11)
    assert c.interval == pytest.approx((centre - half - 0.11, centre + half - 0.11))
    assert c.verdict == HOLDS and proportion_contrast(5, 60, null=0.11).verdict == NOT_SHOWN
    assert proportion_contrast(0, 60, null=0.11).verdict == REVERSED


def test_over_seeds_a_claim_holds_only_where_it_holds_at_every_seed():
    seeds = [[make("a", 0.06, (0.03, 0.09)), make("b", 0.05, (0.01, 0.09)), make("c", -0.1, (-0.2, -0.05)),
              make("only0", 0.1, (0.05, 0.2))],
             [make("a", 0.04, (0.01, 0.07)), make("b", 0.02, (-0.02, 0.06)), make("c", -0.2, (-0.3, -0.1))],
             [make("a", 0.08, (0.05, 0.11)), make("b", 0.06, (0.02, 0.10)), make("c", -0.15, (-0.25, -0.1))]]
    out = {f.key: f for f in combine(seeds)}
    assert set(out) == {"a", "b", "c"}  # measured at one seed only: no verdict over seeds
    a, b, c = out["a"], out["b"], out["c"]
    assert a.verdict == HOLDS and a.seeds == 3 and a.per_seed == (0.06, 0.04, 0.08)
    assert a.measured == pytest.approx(0.06) and a.interval == (0.04, 0.08)  # mean, and the range over seeds
    assert b.verdict == NOT_SHOWN and b.seed_verdicts == (HOLDS, NOT_SHOWN, HOLDS)
    assert c.verdict == REVERSED
    table = findings_table(list(out.values()))
    assert "3 seeds (3 of 3 holds)" in table and "3 seeds (holds, not shown, holds)" in table
    assert "1 holds, 1 not shown, 1 reversed of 3 claims" in table


def test_findings_json_round_trips_and_each_analysis_replaces_only_its_own(tmp_path):
    path = tmp_path / "findings.json"
    write_findings(path, [make("t1.a", 0.1, (0.05, 0.15)), make("t1.b", 0.0, (-math.inf, math.inf))])
    write_findings(path, [make("f7.a", 0.3, (0.2, 0.4), analysis="fig7")])
    got = {f.key: f for f in read_findings(path)}
    assert set(got) == {"t1.a", "t1.b", "f7.a"}
    assert got["t1.b"].interval == (-math.inf, math.inf)  # infinite ends survive JSON (as null)
    data = json.loads(path.read_text())
    assert data["seeds"] == 1
    assert {"claim", "source", "measured", "interval", "verdict", "analysis"} <= set(data["findings"][0])
    write_findings(path, [make("t1.c", -0.2, (-0.3, -0.1))])  # table1 again: its old entries go
    assert sorted(f.key for f in read_findings(path)) == ["f7.a", "t1.c"]
    assert read_findings(path)[-1].verdict == REVERSED
    with pytest.raises(ConvscopeError, match="duplicate finding keys"):
        write_findings(path, [make("x", 0.1, (0.0, 0.2)), make("x", 0.1, (0.0, 0.2))])


def test_a_damaged_findings_file_is_named_not_half_read(tmp_path):
    path = tmp_path / "findings.json"
    path.write_text('{"findings": [{"key": "a"')
    with pytest.raises(ConvscopeError, match="findings.json is damaged"):
        read_findings(path)
    assert read_findings(tmp_path / "none.json") == []


def test_the_findings_command_prints_one_run_and_combines_seeds(tmp_path):
    from click.testing import CliRunner

    from convscope.cli import main

    runs = []
    for seed, (m, lo, hi) in enumerate([(0.06, 0.03, 0.09), (0.02, -0.02, 0.06), (0.05, 0.01, 0.09)]):
        run = tmp_path / f"seed-{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"seed": seed}))
        write_findings(run / "findings.json", [make("table1.fc7.left_eye", m, (lo, hi)),
                                               make("fig7.on_object", 0.8, (0.7, 0.9), analysis="fig7")])
        runs.append(str(run))
    one = CliRunner().invoke(main, ["findings", runs[0]])
    assert one.exit_code == 0 and "| claim table1.fc7.left_eye |" in one.output and "2 holds, 0 not shown" in one.output
    out = tmp_path / "over-seeds.json"
    many = CliRunner().invoke(main, ["findings", *runs, "--out", str(out)])
    assert many.exit_code == 0, many.output
    assert "3 seeds (holds, not shown, holds)" in many.output and "3 seeds (3 of 3 holds)" in many.output
    combined = {f.key: f for f in read_findings(out)}
    assert combined["table1.fc7.left_eye"].verdict == NOT_SHOWN and combined["fig7.on_object"].verdict == HOLDS
    assert json.loads(out.read_text())["seeds"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    r = CliRunner().invoke(main, ["findings", str(empty)])
    assert r.exit_code != 0 and "no findings" in r.output
