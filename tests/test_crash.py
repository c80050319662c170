"""Nothing lost, nothing wrong after a crash: each of the windows a hostile user found is reproduced here (a kill
between two writes, two writers at once, damaged run files) and must leave a run that works."""

from __future__ import annotations

import json
import multiprocessing
import re
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import convscope as cs
from convscope import artifacts
from convscope.checkpoint import load_model, save_weights
from convscope.cli import main
from convscope.config import TrainConfig
from convscope.layout import Layout
from convscope.train import load_data, train

TINY = dict(model="zfnet_small", data="synthetic", n_train=64, n_val=32, n_test=32, epochs=2, batch_size=32,
            model_options={"widths": [8, 8, 8, 8, 8], "fc": [16, 16]})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, and the bytes of its files."""
    run = tmp_path_factory.mktemp("crash") / "run"
    train(TrainConfig(**TINY), run, progress=False)
    return run, {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def same_weights(a: Path, b: Path) -> bool:
    """The same tensors and metadata (safetensors orders its header as it likes, so bytes may differ)."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return (fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def copy(finished, tmp_path, without=()):
    run, files = finished
    out = tmp_path / "run"
    for rel, data in files.items():
        if str(rel) not in without:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
    return out


def test_a_kill_between_the_final_weights_and_the_test_result_is_finished_by_the_same_command(finished, tmp_path):
    """Before: a kill after model.safetensors but before test.json left a run every later `convscope train`
    failed on (FileNotFoundError, for ever). Either order of the two is now finished by training again."""
    for missing in ("test.json", "model.safetensors"):
        run = copy(finished, tmp_path / missing, without=(missing,))
        result = train(TrainConfig(**TINY), run, progress=False)
        assert json.loads((run / "test.json").read_bytes()) == json.loads(finished[1][Path("test.json")])
        assert same_weights(run / "model.safetensors", finished[0] / "model.safetensors")
        assert result.test == json.loads((run / "test.json").read_text())


def test_a_kill_during_the_first_config_write_leaves_a_directory_that_trains(tmp_path):
    """Before: the temp file of the killed write made the directory "not an empty directory or a convscope run"
    for good. Temp files of convscope's own writes are not content: they are cleaned, and training starts."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.json.ab12cd.tmp").write_bytes(b'{"model": "zfnet_sm')  # what the kill left
    result = train(TrainConfig(**{**TINY, "epochs": 1}), run, progress=False)
    assert result.metrics[0]["epoch"] == 1 and not (run / ".config.json.ab12cd.tmp").exists()


SLOW_TINY = {**TINY, "epochs": 4, "n_train": 512}


def _train_in_child(run, outcome):
    from convscope.errors import ConvscopeError

    try:
        train(TrainConfig(**SLOW_TINY), run, progress=False)
        outcome.put("trained")
    except ConvscopeError as e:
        outcome.put(f"refused: {e}")


def test_two_processes_never_write_one_run(tmp_path):
    """Before: two `convscope train` on one new directory both believed they owned it (10 of 40 tries)."""
    run = tmp_path / "run"
    (tmp_path / "same.json").write_text(json.dumps(TrainConfig(**SLOW_TINY).to_dict()))
    ctx = multiprocessing.get_context("spawn")
    outcome = ctx.Queue()
    first = ctx.Process(target=_train_in_child, args=(run, outcome))
    first.start()
    deadline = time.monotonic() + 120
    while not (run / ".lock").exists() or b"process" not in (run / ".lock").read_bytes():
        assert time.monotonic() < deadline, "the first process never took the lock"
        time.sleep(0.02)
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "same.json"), "--out", str(run)])
    owner = (run / ".lock").read_text()
    first.join(300)
    assert outcome.get(timeout=10) == "trained"
    assert r.exit_code == 2 and "is in use by process" in r.output, r.output
    assert f"process {first.pid} (convscope train zfnet_small on synthetic" in owner
    # the lock went with its process: the run is free again, and finished
    with artifacts.lock(run):
        assert cs.open_run(run).config.epochs == 4


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("config"), "no 'config'"),
    (lambda m: m.pop("classes"), "no 'classes'"),
    (lambda m: m.update(config="{not json"), "Expecting"),
    (lambda m: m.update(config='["a list"]'), "not a table naming the model"),
    (lambda m: m.update(num_classes="three"), "invalid literal"),
    (lambda m: m.update(classes='["only one"]'), "do not name 3 classes"),
    (lambda m: m.update(epoch="-5"), "epoch -5"),
])
def test_damaged_checkpoint_metadata_names_the_file_and_the_entry(tmp_path, damage, message):
    model = cs.create_model("zfnet_small", 3, widths=[8, 8, 8, 8, 8], fc=[16, 16])
    config = {"model": "zfnet_small", "model_options": {"widths": [8, 8, 8, 8, 8], "fc": [16, 16]}}
    path = save_weights(tmp_path / "w.safetensors", model, config, 1, 3, ["a", "b", "c"])
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    damage(meta)
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(cs.ConvscopeError, match=f"{path.name}.*has damaged metadata .*{message}"):
        load_model(path)


@pytest.mark.parametrize("state, message", [
    ([1, 2], "not a convscope training state \\(list\\)"),
    ({"model": {}}, "not a convscope training state"),
    ("epoch", "epoch -5, not one of this run's 0..2"),
    ("metrics", "not one entry per epoch"),
    ("model", "does not fit this run's model"),
])
def test_a_training_state_of_the_wrong_structure_is_refused_with_what_to_do(finished, tmp_path, state, message):
    """Before: `epoch=-5` silently trained 9 epochs; other structures ended in tracebacks."""
    run = copy(finished, tmp_path, without=("test.json",))  # not finished: the state is what training resumes
    good = torch.load(run / "state.pt", weights_only=True)
    if state == "epoch":
        state = {**good, "epoch": -5}
    elif state == "metrics":
        state = {**good, "metrics": good["metrics"][:1]}
    elif state == "model":
        state = {**good, "model": {"features.conv1.weight": torch.zeros(1)}}
    artifacts.save_torch(run / "state.pt", state)
    r = CliRunner().invoke(main, ["train", "--config", str(run / "config.json"), "--out", str(run)])
    assert r.exit_code == 2 and re.search(message, r.output), r.output
    assert "delete" in r.output and "state.pt" in r.output
    assert not (run / "test.json").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"), ('["a", "list"]', "holds a list"),
    ('{"epochs": "thirty"}', "is damaged: epochs must be a whole number"),
])
def test_a_damaged_run_config_is_an_error_not_a_traceback(finished, tmp_path, content, message):
    run = copy(finished, tmp_path)
    (run / "config.json").write_text(content)
    r = CliRunner().invoke(main, ["scan", str(run)])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not Layout(run).topk.exists()


# ----------------------------------------------------------------------------- SIGKILL at random moments

KILLED = {**TINY, "epochs": 6, "n_train": 96, "batch_size": 16, "save_epochs": [1, 2, 3, 4, 5, 6]}


def _train_job(config_file: str, run: str) -> None:
    """`convscope train --config FILE --out RUN`, the command itself (one thread, so every start sums alike)."""
    import torch

    torch.set_num_threads(1)
    main(["train", "--config", config_file, "--out", run], standalone_mode=False)


def _scan_job(run: str, out: str) -> None:
    import torch

    from convscope.topk import save_topk, scan

    torch.set_num_threads(1)
    r = cs.open_run(run)
    state = Path(out) / "state.pt"
    with artifacts.lock(out, "scan job"):  # as `convscope scan` holds its run
        topk = scan(r.model, r.split("train"), ["conv1", "conv3", "conv5"], k=9, batch_size=8, save_every=1,
                    state_path=state, progress=False, identity={"split": "train"})
        save_topk(Path(out) / "topk.safetensors", topk, {"split": "train"})
        artifacts.remove(state)


def _all_files_load(folder: Path) -> int:
    """Open every file a kill left (but the lock and temp files, which the next run cleans): none is corrupt."""
    from safetensors import safe_open

    n = 0
    for path in folder.rglob("*"):
        if not path.is_file() or artifacts.is_temp(path.name):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                [f.get_tensor(k) for k in f.keys()]
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        n += 1
    return n


def _working(p, folder: Path) -> bool:
    """Wait until process ``p`` holds the lock of ``folder`` (it is past its imports, at its work); False if it
    ended first."""
    lock = folder / artifacts.LOCK
    while p.is_alive():
        if lock.exists() and f"process {p.pid} " in lock.read_text(errors="replace"):
            return True
        time.sleep(0.002)
    return False


def _timed(ctx, target, args) -> float:
    """Run the job once, uninterrupted: the seconds it works (from taking the lock to its end)."""
    p = ctx.Process(target=target, args=args)
    p.start()
    assert _working(p, Path(args[-1]))
    t0 = time.perf_counter()
    p.join()
    assert p.exitcode == 0
    return time.perf_counter() - t0


def _kill_loop(ctx, target, args, rng, work: float, limit: int) -> tuple[int, int]:
    """Start the job again and again, each time SIGKILLed at a random moment of its work (uniform over the time
    an uninterrupted job works), until one start ends on its own or ``limit`` kills are done (then the last
    start runs to its end); every restart must resume without an error, and every file a kill leaves must load.
    Returns (kills, kills that found files written)."""
    kills = landed = 0
    while True:
        p = ctx.Process(target=target, args=args)
        p.start()
        if _working(p, Path(args[-1])):
            p.join(rng.uniform(0, work) if kills < limit else None)
        if p.is_alive():
            p.kill()
            p.join()
            kills += 1
            landed += _all_files_load(Path(args[-1])) > 1  # more than the lock
            continue
        assert p.exitcode == 0, f"a restart failed (exit {p.exitcode}) after {kills} kills"
        return kills, landed


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_ends_bit_identical(tmp_path):
    """Training and the scan, each killed (SIGKILL) at random moments and started again until they finish: no
    file is ever corrupt, every restart resumes, and the results equal an uninterrupted run's bit for bit."""
    import random

    from convscope.topk import load_topk

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "convscope", "convscope.train", "convscope.topk", __name__])
    rng = random.Random(0)
    load_data(TrainConfig(**KILLED))  # the synthetic images rendered and cached: every start loads them alike
    warm = ctx.Process(target=time.sleep, args=(0,))  # the fork server started (it imports torch once)
    warm.start()
    warm.join()
    reference = tmp_path / "reference"  # trained the same way, in one go (one thread: the same sums)
    config = tmp_path / "killed.json"
    config.write_text(json.dumps(TrainConfig(**KILLED).to_dict()))
    work = _timed(ctx, _train_job, (str(config), str(reference)))
    kills = landed = 0
    for i in range(100):  # runs, each killed until one start finishes it; as many as 12 kills take, and more
        if kills >= 12 and landed >= 6:  # while too few kills found files written (timing decides: once 2 of 22)
            break
        killed = tmp_path / f"killed{i}"
        k, w = _kill_loop(ctx, _train_job, (str(config), str(killed)), rng, work, max(12 - kills, 2))
        kills, landed = kills + k, landed + w
        for name in ["model.safetensors", *(f"checkpoints/epoch_{e:03d}.safetensors" for e in range(1, 7))]:
            assert same_weights(killed / name, reference / name), name
        strip = [{k: v for k, v in m.items() if k != "seconds"}
                 for m in json.loads((killed / "metrics.json").read_text())]
        assert strip == [{k: v for k, v in m.items() if k != "seconds"}
                         for m in json.loads((reference / "metrics.json").read_text())]
        assert json.loads((killed / "test.json").read_text()) == json.loads((reference / "test.json").read_text())
    assert kills >= 12

    whole_dir = tmp_path / "whole"
    whole_dir.mkdir()
    work = _timed(ctx, _scan_job, (str(reference), str(whole_dir)))
    whole, _ = load_topk(whole_dir / "topk.safetensors")
    more = 0
    for i in range(100):
        if more >= 10:
            break
        out = tmp_path / f"scan{i}"
        out.mkdir()
        k, w = _kill_loop(ctx, _scan_job, (str(reference), str(out)), rng, work, 10 - more)
        more, landed = more + k, landed + w
        got, _ = load_topk(out / "topk.safetensors")
        for layer in whole.layers:
            for field in ("values", "images", "positions"):
                assert torch.equal(getattr(got, field)[layer], getattr(whole, field)[layer]), (layer, field)
        assert not (out / "state.pt").exists()
    print(f"SIGKILL: {kills} in training, {more} in the scan, {landed} after files were written")
    assert kills + more >= 22 and landed >= 6  # most land while the job writes; timing decides how many


@pytest.mark.parametrize("existing", [False, True])
def test_a_training_that_fails_before_its_first_epoch_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    """What a failed command created is removed (the run directory, or the files new in an empty one), unless an
    epoch was committed; a failure after one keeps the run, which the same command resumes."""
    import convscope.train as training

    run = tmp_path / "run"
    if existing:
        run.mkdir()
        (run / ".lock").write_text("")  # an earlier command's lock file stays as it was

    def broken(*args, **kwargs):
        raise RuntimeError("the model does not build")

    monkeypatch.setattr(training, "build_model", broken)
    with pytest.raises(RuntimeError, match="does not build"):
        train(TrainConfig(**{**TINY, "epochs": 1}), run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == [".lock"] if existing else not run.exists()
    monkeypatch.undo()
    calls = []

    def fail_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = training.train_epoch
    monkeypatch.setattr(training, "train_epoch", fail_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**{**TINY, "epochs": 2}), run, progress=False)
    assert {"config.json", "state.pt", "metrics.json"} <= {p.name for p in run.iterdir()}
