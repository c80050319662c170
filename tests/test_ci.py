"""CI's script (``.ci/run``) fails when any step of the README's test command fails: the install, the tests, or
a test run that collects nothing. Each case runs the real script with ``pip``, ``python``, ``ruff`` and
``apt-get`` replaced by stubs that exit as told and log their calls."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
if [ "$(basename "$0")" = pip ] && [ "$1" = list ]; then exit 0; fi
exit ${code}
"""


def ci(tmp_path, pip=0, python=0, ruff=0) -> tuple[int, list[str]]:
    """Run a copy of ``.ci/run`` with stubbed tools (exit codes as given); its exit code and the stubs' calls."""
    repo, bin_ = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    bin_.mkdir()
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    log = tmp_path / "calls.log"
    log.touch()
    for tool, code in (("pip", pip), ("python", python), ("ruff", ruff), ("apt-get", 0)):
        (bin_ / tool).write_text(STUB.replace("{log}", str(log)).replace("${code}", str(code)))
        (bin_ / tool).chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "CI": "true"}
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, [line.split()[0] for line in log.read_text().splitlines()]


def test_a_passing_run_passes_and_runs_every_step(tmp_path):
    code, calls = ci(tmp_path)
    assert code == 0
    assert calls[:3] == ["pip", "python", "ruff"]


def test_a_failed_install_fails_ci_before_the_tests_and_the_linter(tmp_path):
    code, calls = ci(tmp_path, pip=1)
    assert code == 1
    assert calls == ["pip"]


@pytest.mark.parametrize("exit_code", [1, 5])  # 5: pytest collected no test
def test_failing_or_empty_tests_fail_ci(tmp_path, exit_code):
    code, calls = ci(tmp_path, python=exit_code)
    assert code == exit_code
    assert "ruff" not in calls


def test_a_lint_error_fails_ci(tmp_path):
    assert ci(tmp_path, ruff=1)[0] == 1


def test_the_oracles_import():
    """Captum, Quantus and scikit-image are the test suite's oracles: the test modules import them at the top, so
    without them collection fails (CI red) rather than tests being skipped."""
    import captum.attr
    import quantus
    import skimage.metrics

    assert captum.attr.NeuronDeconvolution and quantus.MPRT and skimage.metrics.structural_similarity
    assert os.environ.get("CI") is None or shutil.which("chromium") or Path("/usr/bin/chromium").exists()


def test_the_suite_keeps_its_data_out_of_the_users_cache(data_cache):
    from convscope.data.synthetic import cache_dir

    assert cache_dir() == data_cache and Path.home() / ".cache" / "convscope" not in (data_cache, *data_cache.parents)
