"""The scan on several processes (torch.distributed, gloo on the CPU, 127.0.0.1 only): `torchrun -m convscope
scan` gives the single-process top-k exactly, each rank scanning only its shard; a rank killed mid-way resumes its
shard; a run another job is writing is refused by every rank."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from convscope import artifacts
from convscope.layout import Layout
from convscope.topk import load_topk, scan

pytestmark = pytest.mark.slow
LAYERS = ["conv1", "conv5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, n: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node n -m convscope ARGS`` on 127.0.0.1, one thread a process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "convscope", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def copied_run(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed") / "run"
    shutil.copytree(trained_run.path, root, ignore=shutil.ignore_patterns("checkpoints", "scan", "figures", ".lock"))
    return root


@pytest.fixture(scope="module")
def single(trained_run):
    """The single-process scan of the validation split."""
    return scan(trained_run.model, trained_run.split("val"), LAYERS, k=9, progress=False, class_k=25)


def test_torchrun_scan_equals_the_single_process_scan(copied_run, single):
    r = torchrun("scan", str(copied_run), "--layers", ",".join(LAYERS), "--units", "4", "--split", "val")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("scanned 1000 images") == 1  # rank 0 speaks for the job
    topk, info = load_topk(Layout(copied_run).topk)
    assert info["world_size"] == 2 and info["shards"] == [[0, 500, 500], [500, 1000, 500]]  # each its own half
    for layer in LAYERS:
        for field in ("values", "images", "positions", "class_values", "class_images"):
            assert torch.equal(getattr(topk, field)[layer], getattr(single, field)[layer]), (layer, field)
    layout = Layout(copied_run)
    drawn = [json.loads(layout.of_rank(layout.drawn, rank, 2).read_text())["units"] for rank in (0, 1)]
    for layer in LAYERS:  # the drawing split too: every other chosen unit to each rank, all of them drawn
        chosen = sorted(drawn[0][layer] + drawn[1][layer])
        assert len(chosen) == 4 and drawn[0][layer] == chosen[0::2] and drawn[1][layer] == chosen[1::2]
        assert all(layout.unit(layer, u).is_file() and layout.unit_thumb(layer, u).is_file() for u in chosen)
    assert not list(layout.scan.glob("state*"))  # every rank's resume state removed at the end
    manifest = json.loads(layout.manifest.read_text())["fig2"]
    assert "scan/topk.safetensors" in manifest and "findings.json" in manifest  # and Fig. 2's verdicts
    assert len(manifest) == 2 + 2 * (1 + 4 * 3)  # per layer its panel, per unit projections, patches, thumbnail


def test_two_nodes_by_rendezvous_with_workers_equal_the_single_process_scan(copied_run, single, tmp_path):
    """Two "machines" (two torchrun launchers of one process each, on 127.0.0.1) meeting by torchrun's c10d
    rendezvous, as the README's multi-node line does, each rank's images decoded by 2 DataLoader workers."""
    shutil.rmtree(Layout(copied_run).scan, ignore_errors=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
         "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "convscope-test", "--rdzv-conf",
         f"is_host={node == 0},join_timeout=120", "-m", "convscope", "scan", str(copied_run), "--layers",
         ",".join(LAYERS), "--units", "2", "--split", "val", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node in (0, 1)]
    out = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), out
    assert sum(o.count("scanned 1000 images") for o, _ in out) == 1
    topk, info = load_topk(Layout(copied_run).topk)
    assert info["world_size"] == 2 and info["shards"] == [[0, 500, 500], [500, 1000, 500]]
    for layer in LAYERS:
        for field in ("values", "images", "positions", "class_values", "class_images"):
            assert torch.equal(getattr(topk, field)[layer], getattr(single, field)[layer]), (layer, field)


def test_a_run_another_job_writes_is_refused_by_every_rank(copied_run):
    before = sorted(p.relative_to(copied_run) for p in copied_run.rglob("*"))
    with artifacts.lock(copied_run, "a test holding the run"):
        r = torchrun("scan", str(copied_run), "--layers", "conv1", "--units", "1")
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("is in use by process") == 2, r.stdout + r.stderr  # both ranks say why
    assert sorted(p.relative_to(copied_run) for p in copied_run.rglob("*")) == before


def test_a_rank_that_cannot_reach_the_others_says_so_and_writes_nothing(copied_run):
    before = sorted(p.relative_to(copied_run) for p in copied_run.rglob("*"))
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "CONVSCOPE_DIST_TIMEOUT": "2"}  # nobody listens: no rank 0
    r = subprocess.run([sys.executable, "-m", "convscope", "scan", str(copied_run)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and "error: rank 1 of 2 cannot reach the other processes at 127.0.0.1:" in r.stderr
    assert "within 2 s" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.relative_to(copied_run) for p in copied_run.rglob("*")) == before
    env["CONVSCOPE_DIST_TIMEOUT"] = "soon"
    r = subprocess.run([sys.executable, "-m", "convscope", "scan", str(copied_run)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and "CONVSCOPE_DIST_TIMEOUT must be a whole number of seconds" in r.stderr


def _rank(rank: int, port: int, run_dir: str, die_after: int, counts: str) -> None:
    """One rank of a 2-process scan (as torchrun would start it), saving its state every batch of 50 images;
    rank 1 dies (os._exit, as under SIGKILL) when it asks for batch ``die_after`` (0: never)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from convscope import distributed
    from convscope.run import open_run

    run = open_run(run_dir)
    data = run.split("val")
    batches = []
    original = data.batch

    def batch(index):
        batches.append(len(index))
        if rank == 1 and die_after and len(batches) == die_after:
            os._exit(9)
        return original(index)

    data.batch = batch
    group = distributed.init()
    topk = scan(run.model, data, LAYERS, k=9, batch_size=50, save_every=1, progress=False, class_k=25,
                state_path=run.layout.of_rank(run.layout.scan_state, rank, 2), group=group)
    if rank == 0:
        artifacts.save_torch(os.path.join(run_dir, "merged.pt"), {"values": topk.values, "images": topk.images,
                                                                    "positions": topk.positions})
    with open(f"{counts}.{rank}", "w") as f:
        f.write(str(len(batches)))


def test_a_killed_rank_resumes_its_shard(copied_run, single, tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    layout = Layout(copied_run)
    counts = str(tmp_path / "batches")

    def start(die_after: int) -> list:
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, port, str(copied_run), die_after, counts)) for r in (0, 1)]
        for p in procs:
            p.start()
        return procs

    procs = start(die_after=5)  # rank 1 dies asking for its 5th batch: 4 of its 10 saved
    procs[1].join(300)
    assert procs[1].exitcode == 9
    deadline = time.monotonic() + 60  # rank 0 finishes its shard, then waits for rank 1 at the gather: stop it
    while procs[0].is_alive() and time.monotonic() < deadline and not os.path.exists(f"{counts}.0"):
        time.sleep(0.2)
    procs[0].kill()
    procs[0].join()
    state = torch.load(layout.of_rank(layout.scan_state, 1, 2), weights_only=True)
    assert state["done"] == 200 and state["key"]["shard"] == [500, 1000]

    procs = start(die_after=0)
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    assert open(f"{counts}.1").read() == "6"  # rank 1 scanned only the 300 images it had not
    merged = torch.load(copied_run / "merged.pt", weights_only=True)
    for layer in LAYERS:
        for field in ("values", "images", "positions"):
            assert torch.equal(merged[field][layer], getattr(single, field)[layer]), (layer, field)


def test_ddp_training_ends_where_one_process_does(tmp_path):
    """2 epochs of the recipe on 2 DDP processes (gloo), the global batch kept: the same metrics and, after 14
    SGD steps, weights within 1e-5 (relative) of one process's. Not bit for bit: the gradient is the mean of the
    two halves' sums, added in another order than one process adds the whole batch. Dropout is off here: with
    it on, each rank draws its own masks (a stream of its own), so the runs differ as two seeds do. One set of
    files: only rank 0 writes."""
    from safetensors.torch import load_file

    from convscope.config import TrainConfig
    from convscope.train import train

    cfg = TrainConfig(model="zfnet_small", data="synthetic", n_train=400, n_val=100, n_test=100, epochs=2,
                      batch_size=64, lr=0.05, model_options={"widths": [8, 8, 12, 12, 8], "fc": [16, 16],
                                                             "dropout": 0.0})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_dict()))
    torch.set_num_threads(1)
    train(cfg, tmp_path / "one", progress=False)
    r = torchrun("train", "--config", str(config), "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("run directory:") == 1
    one, two = Layout(tmp_path / "one"), Layout(tmp_path / "two")
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in json.loads(one.metrics.read_text())]
    got = [{k: v for k, v in m.items() if k != "seconds"} for m in json.loads(two.metrics.read_text())]
    assert len(got) == 2 and all(a.keys() == b.keys() for a, b in zip(got, strip))
    assert all(a[k] == pytest.approx(b[k], rel=1e-5) for a, b in zip(got, strip) for k in a)
    a, b = load_file(one.final), load_file(two.final)
    worst = max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a if a[k].norm() > 0)
    assert worst < 1e-5, worst  # measured 9e-7
    assert sorted(p.name for p in two.root.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in one.root.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in two.checkpoints.iterdir()) == ["epoch_001.safetensors", "epoch_002.safetensors"]
