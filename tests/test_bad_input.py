"""Bad input, as a hostile user gives it: generated options and config files. Every command exits 0 or 2, never
with a traceback, and writes nothing when it exits 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import TINY_ARGS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convscope as cs
from convscope.cli import main


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``roots`` with its size and modification time (but a run's ``.lock``, which says who holds
    it: bookkeeping, not content)."""
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f == ".lock":
                    continue
                st_ = os.stat(os.path.join(dirpath, f))
                out[os.path.join(dirpath, f)] = (st_.st_size, st_.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tiny_files, tmp_path_factory):
    """An attached tiny run, the user's files, and an empty place for new runs."""
    root = tmp_path_factory.mktemp("hostile")
    cs.attach("zfnet_small", "folder", root / "run", data_root=tiny_files / "images", model_args=TINY_ARGS)
    (root / "new").mkdir()
    return root, tiny_files


INTS = st.one_of(st.integers(max_value=-1), st.integers(min_value=10**7), st.integers(min_value=2**63),
                 st.sampled_from(["", "x", "1.5", "nan", "1e9", "-0", "0x10"]))
NAMES = st.one_of(st.text(max_size=6), st.sampled_from(["", ",", " , ", "conv9", "../x", "all#3", "features.99",
                                                        "conv1#9", "\x00", "é", "fc6#0"]))
FLOATS = st.one_of(st.sampled_from(["nan", "inf", "-1", "0", "", "x", "1e400", "-0.0"]), st.floats(max_value=0))

# command -> (cheap valid arguments, the options to spoil and what kind of value each takes)
RUN = "{root}/run"
COMMANDS = {
    "scan": ([RUN, "--units", "1", "--k", "2"], {"--k": INTS, "--units": INTS, "--seed": INTS, "--layers": NAMES,
                                                  "--split": NAMES, "--rule": NAMES}),
    "evolution": ([RUN, "--checkpoints", "{files}/epochs", "--units", "1", "--n-images", "4"],
                  {"--units": INTS, "--n-images": INTS, "--seed": INTS, "--layers": NAMES, "--rule": NAMES,
                   "--checkpoints": NAMES}),
    "invariance": ([RUN, "--n", "1"], {"--n": INTS, "--split": NAMES, "--mode": NAMES}),
    "filters": ([RUN, "--n-images", "2"], {"--n-images": INTS, "--compare": NAMES}),
    "occlusion": ([RUN, "--n", "1"], {"--n": INTS, "--size": INTS, "--stride": INTS, "--batch-size": INTS,
                                      "--layer": NAMES, "--split": NAMES}),
    "correspondence": ([RUN, "--parts-json", "{files}/parts.json", "--draws", "1"],
                       {"--draws": INTS, "--size": INTS, "--seed": INTS, "--parts": NAMES, "--class": NAMES,
                        "--parts-json": NAMES}),
    "transfer": ([RUN, "--target", "run", "--shots", "1", "--folds", "1", "--no-scratch"],
                 {"--shots": NAMES, "--folds": INTS, "--seed": INTS, "--features": NAMES, "--target": NAMES,
                  "--scratch-steps": INTS}),
    "probe-layers": ([RUN, "--target", "run", "--n-per-class", "1"],
                     {"--n-per-class": INTS, "--grid": INTS, "--seed": INTS, "--layers": NAMES, "--pool": NAMES,
                      "--target": NAMES}),
    "project": ([RUN, "--image", "{files}/images/car/001.png", "--out", "{root}/new/p.png"],
                {"--layer": NAMES, "--channels": NAMES, "--rule": NAMES, "--image": NAMES}),
    "dissect": ([RUN, "--masks", "{files}/concepts", "--n", "4"],
                {"--n": INTS, "--batch-size": INTS, "--quantile": FLOATS, "--iou": FLOATS, "--layers": NAMES,
                 "--split": NAMES, "--masks": NAMES}),
    "layers": ([RUN], {"--image-size": INTS}),
    "report": ([RUN], {}),
    "serve": ([RUN], {"--port": INTS}),  # every value drawn is a bad port: a good one would serve for ever
    "train": (["--n-train", "16", "--n-val", "8", "--n-test", "8", "--epochs", "1", "--batch-size", "8", "--out",
               "{root}/new/t"],
              {"--epochs": INTS, "--batch-size": INTS, "--lr": FLOATS, "--seed": INTS, "--n-train": INTS,
               "--image-size": INTS, "--model": NAMES, "--data": NAMES, "--config": NAMES, "--data-root": NAMES}),
    "attach": (["--model", "zfnet_small", "--data", "digits", "--out", "{root}/new/a"],
               {"--model": NAMES, "--model-arg": NAMES, "--weights": NAMES, "--data": NAMES, "--data-root": NAMES,
                "--image-size": INTS, "--normalize": NAMES, "--classes": NAMES, "--nonlinearities": NAMES,
                "--seed": INTS}),
    "ablate": (["--config", "pairs", "--n-train", "8", "--epochs", "1", "--batch-size", "4", "--variants", "full",
                "--out", "{root}/new/ab"], {"--variants": NAMES, "--epochs": INTS, "--n-train": INTS}),
}
# A run argument a hostile user gives instead: missing, a file, no run, a NUL byte.
BAD_RUNS = ["{root}/missing", "{files}/parts.json", "{root}/new", "\x00", ""]


def spoil(draw, command: str, root: Path, files: Path) -> list[str]:
    valid, options = COMMANDS[command]
    args = [a.format(root=root, files=files) for a in valid]
    if options and (args[:1] != [str(root / "run")] or draw(st.integers(0, 9)) > 0):
        option = draw(st.sampled_from(sorted(options)))
        if option in args:  # replace the valid value of that option
            i = args.index(option)
            del args[i:i + 2]
        args += [option, str(draw(options[option]))]
    else:
        args[0] = draw(st.sampled_from(BAD_RUNS)).format(root=root, files=files)
    return [command, *args]


@st.composite
def bad_commands(draw, root, files):
    return spoil(draw, draw(st.sampled_from(sorted(COMMANDS))), root, files)


def check(args: list[str], watched: list[Path]) -> None:
    before = snapshot(*watched)
    r = CliRunner().invoke(main, args)
    assert r.exit_code in (0, 2), f"{args}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
    if r.exit_code == 2:
        assert "error" in r.output.lower() or "usage" in r.output.lower(), (args, r.output)
        assert snapshot(*watched) == before, f"{args} exited 2 but wrote files"


# One value per kind that no option of that kind takes: each must be refused (exit 2), not run.
REFUSED = {id(INTS): "-1", id(NAMES): "conv9\x00", id(FLOATS): "nan"}


@pytest.mark.slow
@pytest.mark.parametrize("command,option", [(c, o) for c, (_, options) in COMMANDS.items() for o in options
                                            if (c, o) != ("correspondence", "--class")])  # unused with --parts-json
def test_a_bad_value_of_every_option_is_refused_and_writes_nothing(world, command, option):
    root, files = world
    valid, options = COMMANDS[command]
    args = [a.format(root=root, files=files) for a in valid]
    if option in args:
        i = args.index(option)
        del args[i:i + 2]
    args = [command, *args, option, REFUSED[id(options[option])]]
    before = snapshot(root)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, f"{args}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    assert "error" in r.output.lower() or "usage" in r.output.lower(), (args, r.output)
    assert snapshot(root) == before, f"{args} exited 2 but wrote files"


@pytest.mark.slow
def test_generated_options_exit_0_or_2_never_crash_and_write_nothing_on_2(world):
    """Values drawn at random, some of them valid (a large seed, a text that names nothing but is not used): the
    command runs (0) or refuses (2), never a traceback; the test above holds every option to a refusal."""
    root, files = world

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.data())
    def run(data):
        check(data.draw(bad_commands(root, files)), [root])

    run()


BAD_VALUES = {
    "epochs": [0, -3, "3", 2.5, None, [1], True, 10**9],
    "batch_size": [0, "big", 1e3, None],
    "lr": [0, -0.1, "0.01", None, float("nan"), 1e9],
    "lr_factor": [0, 1, 2, "x"],
    "momentum": [1, -0.5, "0.9"],
    "weight_decay": [-1, "x", 2],
    "patience": [-1, 1.5, "2"],
    "renorm": ["yes", 1, None],
    "renorm_radius": [0, -1, "0.1"],
    "crop_pad": [-1, 2000, "4"],
    "seed": [-1, 2**70, "0", 0.5],
    "image_size": [0, 100000, "64", 7],
    "n_train": [0, -5, "100", 10**12],
    "model": [3, "resnet", None],
    "data": ["imagenet", 5, None],
    "classes": ["face", [], [1, 2], {"a": 1}],
    "model_options": [[1], "x", {"widths": "abc"}, {"widths": [1, 2]}, {"depth": 3}, {"fc": [0, 4]},
                      {"input_size": 100000}, {"dropout": 2}],
    "save_epochs": [[0], "1", [1.5], 7],
    "flip": ["no", 0],
    "nonsense_key": [1],
}


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(BAD_VALUES)), data=st.data(),
       form=st.sampled_from(["dict", "list", "string", "number"]))
def test_generated_bad_config_files_exit_2_and_write_nothing(tmp_path_factory, key, data, form):
    """A config file whose one setting is of the wrong type or range, or that is no table at all: exit 2 and no
    run directory (before, 21 of 34 such files ended in tracebacks or trained nonsense)."""
    root = tmp_path_factory.mktemp("config")
    content = {"dict": {key: data.draw(st.sampled_from(BAD_VALUES[key]))}, "list": [1, 2], "string": "epochs=3",
               "number": 3}[form]
    (root / "c.json").write_text(json.dumps(content))
    r = CliRunner().invoke(main, ["train", "--config", str(root / "c.json"), "--out", str(root / "run")])
    assert r.exit_code == 2, (content, r.output, r.exception)
    assert "error:" in r.output and not (root / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--image-size", "100000"], "image_size must be a whole number from 8 to 4096, got 100000"),
    (["train", "--seed", str(2**70)], "seed must be a whole number from 0 to 9223372036854775807"),
    (["evolution", "{run}", "--units", "0"], "units must be a whole number from 1, got 0"),
    (["filters", "{run}", "--n-images", "0"], "n_images must be a positive whole number, got 0"),
    (["scan", "{run}", "--layers", ","], "no layers named"),
    (["scan", "{run}", "--rule", "bogus"], "unknown rule 'bogus'; valid rules: deconvnet, guided, gradient"),
    (["serve", "{run}", "--port", "99999"], "99999 is not in the range 1<=x<=65535"),
    (["serve", "{run}", "--port", "0"], "0 is not in the range 1<=x<=65535"),
    (["layers", "{run}", "--image-size", "100000"], "--image-size must be a whole number from 8 to 4096"),
])
def test_the_bad_options_a_hostile_user_found_each_get_a_clear_message(world, args, message):
    """The cases the hostile report named: before, each ended in a traceback, scanned the defaults silently,
    failed only after writing the scan, or listened on another port than it printed."""
    root, files = world
    args = [a.format(run=root / "run") for a in args]
    if args[0] == "train":
        args += ["--out", str(root / "new" / "t")]
    before = snapshot(root)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert snapshot(root) == before


def test_unknown_names_list_the_valid_ones_in_good_english():
    from convscope.errors import unknown

    assert str(unknown("class", "cat", ["face", "car"])) == "unknown class 'cat'; valid classes: face, car"
    assert str(unknown("analysis", "fig9", ["fig2"])).endswith("valid analyses: fig2")
    assert str(unknown("data set", "x", ["digits"])).endswith("valid data sets: digits")
    assert str(unknown("entry", "x", ["a"])).endswith("valid entries: a")
