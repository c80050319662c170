"""Shared fixtures. ``trained_run``: zfnet_small trained on the embedded synthetic data with the paper's recipe,
once per test session (two to three minutes on two cores), kept in pytest's cache folder so that a later local
session reuses it (training loads a finished run instead of retraining it). The paper's properties are
checked on it."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")  # before anything imports matplotlib

import pytest  # noqa: E402
from helpers import SEED, TINY_ARGS, TRAINED, keyed, untrained_twin, write_concepts  # noqa: E402


def pytest_configure(config):
    """The allocator setting every ``convscope`` command makes: the trained fixtures train faster."""
    from convscope.cpu import keep_freed_memory

    keep_freed_memory()


@pytest.fixture(scope="session", autouse=True)
def data_cache(request, tmp_path_factory):
    """Every test generates and reads the embedded data sets in a cache folder of the test session's own (kept
    in pytest's cache folder between local sessions, like the trained fixtures), never the user's
    ``~/.cache/convscope``: ``CONVSCOPE_CACHE`` points there, for subprocesses too."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("convscope-data") if cache is not None else tmp_path_factory.mktemp("convscope-data")
    before = os.environ.get("CONVSCOPE_CACHE")
    os.environ["CONVSCOPE_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("CONVSCOPE_CACHE", None)
    else:
        os.environ["CONVSCOPE_CACHE"] = before


@pytest.fixture(scope="session")
def measured(request):
    """``measured(name, value)``: record a number a property test measured (on a trained fixture, or on its
    untrained control, ``control.<name>``). scripts/seeds.py collects them over seeds (CONVSCOPE_MEASURED names the
    JSON file they are written to at the end of the session) to set each margin from the spread."""
    values: dict[str, float] = {}
    yield lambda name, value: values.__setitem__(name, float(value))
    out = os.environ.get("CONVSCOPE_MEASURED")
    if out:
        import json
        from pathlib import Path

        path = Path(out)
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**old, **values}, indent=1, sort_keys=True))


@pytest.fixture(scope="session")
def trained_folder(request, tmp_path_factory):
    """pytest's cache folder (kept between local sessions), or a temporary one under ``-p no:cacheprovider``."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("convscope-trained") if cache is not None else tmp_path_factory.mktemp("convscope-trained")


def _trained(folder, name, options):
    """A run trained once with ``options`` into ``folder`` (keyed by them) and opened; a finished one is loaded."""
    from convscope.config import TrainConfig
    from convscope.run import open_run
    from convscope.train import train

    run_dir = keyed(folder, name, options)
    train(TrainConfig(**options), run_dir, progress=False)
    return open_run(run_dir)


@pytest.fixture(scope="session")
def trained_run(trained_folder):
    return _trained(trained_folder, "zfnet_small-synthetic", TRAINED)


@pytest.fixture(scope="session")
def untrained_run(trained_run):
    """The trained run's control (:func:`untrained_twin`)."""
    return untrained_twin(trained_run)


@pytest.fixture(scope="session")
def untrained_zf(untrained_run):
    """(model, test set) of the untrained control."""
    return untrained_run.model, untrained_run.split("test")


@pytest.fixture(scope="session")
def six_class_run(trained_folder):
    """The demo's pretraining on the first six synthetic classes only, stopped at epoch 10 of its 15 (the
    schedule does not depend on the number of epochs, so this is the demo's epoch-10 checkpoint; 40 s): the other
    six are the held-out target of the transfer experiments (paper Tables 4-5)."""
    from dataclasses import replace

    from convscope.demo import SIX

    return _trained(trained_folder, "zfnet_small-six", replace(SIX, epochs=10, seed=SEED).to_dict())


@pytest.fixture(scope="session")
def trained_zf(trained_run):
    """(model, test set) of the trained run."""
    return trained_run.model, trained_run.split("test")


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """The user's files for a tiny attached run: 30 synthetic images (face, car, house) in an ImageFolder, their
    object masks (``masks/<class>/<name>.png``), a parts file for the faces (their ground-truth eyes and nose),
    and two epoch checkpoints of TINY_ARGS."""
    import json

    import torch
    from PIL import Image

    import convscope as cs
    from convscope.data.synthetic import load_synthetic

    root = tmp_path_factory.mktemp("tiny-files")
    classes = ["face", "car", "house"]
    data = load_synthetic("test", n=30, classes=classes)
    for i in range(len(data)):
        folder = root / "images" / classes[int(data.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
        masks = root / "masks" / classes[int(data.labels[i])]
        masks.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.truth.masks[i].numpy().astype("uint8") * 255).save(masks / f"{i:03d}.png")
    faces = [i for i in range(len(data)) if classes[int(data.labels[i])] == "face"]
    parts = {name: [data.truth.parts[name][i].tolist() for i in faces] for name in ("left_eye", "right_eye", "nose")}
    (root / "parts.json").write_text(json.dumps({
        "images": [f"images/face/{i:03d}.png" for i in faces], "parts": parts,
        "boxes": [data.truth.boxes[i].tolist() for i in faces]}))
    (root / "epochs").mkdir()
    for epoch in (1, 3):
        with torch.random.fork_rng():
            torch.manual_seed(epoch)
            model = cs.create_model("zfnet_small", 3, **TINY_ARGS)
        torch.save(model.state_dict(), root / "epochs" / f"e{epoch}.pt")
    write_concepts(data, root / "concepts", [f"{classes[int(data.labels[i])]}/{i:03d}.png" for i in range(len(data))])
    return root

