"""glibc's default allocator against :func:`convscope.allocator.keep_freed_memory` (freed blocks reused, not
returned to the kernel), each in a fresh process: a training step and an inference forward pass of zfnet_small
(batch 128 of 64 px), and an inference forward pass of zfnet (batch 32 of 224 px, whose conv1 output of 148 MB
glibc always maps afresh).

    python benchmarks/allocator.py

The two settings alternate, twice each; the better of each counts. The numbers computed are the same bit for
bit (the last line checks it); only the time differs.
"""

import json
import subprocess
import sys
import time


def child(tuned: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from convscope.allocator import keep_freed_memory
    from convscope.models import create_model

    changed = keep_freed_memory() if tuned else False
    torch.manual_seed(0)
    model = create_model("zfnet_small", num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(128, 3, 64, 64), torch.randint(0, 10, (128,))

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    train = (time.perf_counter() - t0) / 20
    model.eval()
    with torch.inference_mode():
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
            "checksum": float(out.double().sum()) + float(out_big.double().sum())}


def main() -> None:
    runs = {False: [], True: []}
    for _ in range(2):
        for tuned in (False, True):
            out = subprocess.run([sys.executable, __file__, "child", str(int(tuned))], check=True,
                                 capture_output=True, text=True).stdout
            runs[tuned].append(json.loads(out.splitlines()[-1]))
    keys = {"train": "zfnet_small training step", "forward": "zfnet_small inference forward",
            "forward_224": "zfnet (224 px) inference forward"}
    best = {t: {k: min(r[k] for r in rs) for k in keys} for t, rs in runs.items()}
    print(f"kept freed memory: {'yes' if runs[True][0]['changed'] else 'NO (not glibc?)'}; default and kept, in ms")
    for key, label in keys.items():
        print(f"  {label}: default {best[False][key] * 1e3:.0f}, kept {best[True][key] * 1e3:.0f}, "
              f"kept/default {best[True][key] / best[False][key]:.2f}")
    same = len({r["checksum"] for rs in runs.values() for r in rs}) == 1
    print(f"  the same numbers under both: {same}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(child(bool(int(sys.argv[2])))))
    else:
        main()
