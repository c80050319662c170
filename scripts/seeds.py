"""The spread behind the trained tests' margins: run the tests that assert a property of a trained model (the
paper's findings, on the embedded data) at several training seeds, and print every number they measure, per seed,
with its range, and which tests pass at which seed.

    python scripts/seeds.py                 # seeds 0, 1, 2: about 10 minutes a seed on 2 cores
    python scripts/seeds.py --seeds 0,3,4

Each test records what it measures (the ``measured`` fixture of tests/conftest.py), on the trained fixture and on
its untrained control (``control.*``); a test's margin is set outside this range, and its docstring cites it. The
trained fixtures of each seed are kept in pytest's cache folder, like seed 0's, so a second run only tests. Not run
in CI, which trains seed 0 alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the tests that assert what training made of the model
TESTS = [
    "tests/test_train.py::test_the_main_runs_recipe_reaches_its_accuracy",
    "tests/test_scan_properties.py::test_top9_images_of_upper_units_share_a_class",
    "tests/test_scan_properties.py::test_projection_energy_lies_on_the_object",
    "tests/test_invariance.py::test_trained_net_layer1_moves_more_than_layer7_and_keeps_the_true_class",
    "tests/test_fig6_trained.py",
    "tests/test_occlusion.py::test_trained_net_is_most_sensitive_on_the_object",
    "tests/test_correspondence.py::test_trained_net_parts_and_random_regions",
    "tests/test_pointing.py::test_on_the_trained_net_every_map_points_at_the_object_more_than_the_centre",
    "tests/test_sanity.py::test_guided_backprop_barely_moves_when_the_top_layers_are_randomised",
    "tests/test_probes.py::test_probe_accuracy_rises_with_depth",
    "tests/test_transfer.py::test_on_digits_pretraining_specialises_fc7_and_the_joined_layers_carry",
    "tests/test_transfer.py::test_frozen_features_beat_scratch_on_held_out_classes",
    "tests/test_ablation.py::test_without_conv3_4_and_fc6_7_the_net_cannot_fit_while_without_conv3_4_alone_it_fits",
    "tests/test_visualize.py::test_optimised_images_excite_their_units_beyond_the_best_data_set_image",
]


def run_seed(seed: int, folder: Path, tests: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """The numbers the tests measured at ``seed``, and each test's outcome (passed, failed, error, skipped)."""
    numbers, report = folder / f"measured-{seed}.json", folder / f"junit-{seed}.xml"
    env = {**os.environ, "CONVSCOPE_TEST_SEED": str(seed), "CONVSCOPE_MEASURED": str(numbers)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", f"--junitxml={report}", *tests],
                   cwd=ROOT, env=env, check=False)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        status = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcomes[f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"] = status
    return (json.loads(numbers.read_text()) if numbers.is_file() else {}), outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated training seeds.")
    parser.add_argument("--out", default=None, help="Also write every seed's numbers and outcomes to this JSON.")
    parser.add_argument("tests", nargs="*", default=TESTS, help="Test ids (default: every trained-model test).")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            results[seed] = run_seed(seed, Path(tmp), args.tests)
    names = sorted({n for numbers, _ in results.values() for n in numbers})
    print("\n| measured | " + " | ".join(f"seed {s}" for s in seeds) + " | range |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for name in names:
        values = [results[s][0].get(name) for s in seeds]
        known = [v for v in values if v is not None]
        cells = ["-" if v is None else f"{v:.4g}" for v in values]
        span = f"{min(known):.4g} .. {max(known):.4g}" if known else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {span} |")
    print("\n| test | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for test in sorted({t for _, outcomes in results.values() for t in outcomes}):
        print(f"| {test} | " + " | ".join(results[s][1].get(test, "-") for s in seeds) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({str(s): {"measured": m, "outcomes": o} for s, (m, o) in results.items()},
                                             indent=1))


if __name__ == "__main__":
    main()
