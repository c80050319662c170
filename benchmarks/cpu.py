"""convscope.cpu against PyTorch's defaults, each setting in a fresh process: glibc's default allocator; freed
memory kept (:func:`convscope.cpu.keep_freed_memory`, as every ``convscope`` command runs); and that with
max-pools run channels-last (:func:`convscope.cpu.channels_last_pooling`, as convscope's training runs).
Measured: a training step and an inference forward pass of zfnet_small (batch 128 of 64 px), and an inference
forward pass of zfnet (batch 32 of 224 px, whose conv1 output of 148 MB glibc maps afresh every time).

    python benchmarks/cpu.py

The settings alternate, twice each; the better time of each counts. The numbers computed are the same bit for
bit under all three (the last line checks it); only the time differs.
"""

import contextlib
import json
import subprocess
import sys
import time

SETTINGS = ("default", "kept memory", "kept memory + channels-last pooling")


def child(setting: int) -> dict:
    import torch
    import torch.nn.functional as F

    from convscope.cpu import channels_last_pooling, keep_freed_memory
    from convscope.models import create_model

    changed = keep_freed_memory() if setting >= 1 else False
    pooling = channels_last_pooling if setting == 2 else contextlib.nullcontext
    torch.manual_seed(0)
    model = create_model("zfnet_small", num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(128, 3, 64, 64), torch.randint(0, 10, (128,))

    def step():
        with pooling():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    train = (time.perf_counter() - t0) / 20
    model.eval()
    with torch.inference_mode(), pooling():
        model(x)
        t0 = time.perf_counter()
        for _ in range(10):
            out = model(x)
        forward = (time.perf_counter() - t0) / 10
        big = create_model("zfnet", num_classes=10).eval()
        x = torch.rand(32, 3, 224, 224)
        big(x)
        t0 = time.perf_counter()
        for _ in range(3):
            out_big = big(x)
        forward_224 = (time.perf_counter() - t0) / 3
    return {"changed": changed, "train": train, "forward": forward, "forward_224": forward_224,
            "checksum": [float(model.features.conv1.weight.double().sum()), float(out.double().sum()),
                         float(out_big.double().sum())]}


def main() -> None:
    runs = {s: [] for s in range(len(SETTINGS))}
    for _ in range(2):
        for s in runs:
            out = subprocess.run([sys.executable, __file__, "child", str(s)], check=True, capture_output=True,
                                 text=True).stdout
            runs[s].append(json.loads(out.splitlines()[-1]))
    keys = {"train": "zfnet_small training step", "forward": "zfnet_small inference forward",
            "forward_224": "zfnet (224 px) inference forward"}
    best = {s: {k: min(r[k] for r in rs) for k in keys} for s, rs in runs.items()}
    print(f"glibc mallopt took: {'yes' if runs[1][0]['changed'] else 'NO (not glibc?)'}; times in ms, and over the "
          "default's")
    for key, label in keys.items():
        cells = [f"{SETTINGS[s]} {best[s][key] * 1e3:.0f}" + (f" ({best[s][key] / best[0][key]:.2f})" if s else "")
                 for s in runs]
        print(f"  {label}: " + ", ".join(cells))
    same = len({json.dumps(r["checksum"]) for rs in runs.values() for r in rs}) == 1
    print(f"  the same numbers under all three: {same}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(child(int(sys.argv[2]))))
    else:
        main()
