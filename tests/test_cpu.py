"""convscope.cpu: freed large blocks stay in the process (and are reused) rather than going back to the kernel,
nothing changing where the environment already chose; max-pools run channels-last with PyTorch's numbers."""

import contextlib
import subprocess
import sys

import pytest

PROBE = """
import os, sys, torch
from convscope.cpu import keep_freed_memory
changed = keep_freed_memory() if sys.argv[1] == "1" else False
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
x = torch.ones(64, 1024, 1024)  # 256 MiB, written
before = rss()
del x
print(changed, (before - rss()) / 2**20)
"""


def _freed_mib(tuned: bool, env=None) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(int(tuned))], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_stays_in_the_process_only_when_asked():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    changed, released = _freed_mib(False, env)
    assert changed == "False" and released > 200  # glibc's default: the 256 MiB block goes back at once
    changed, released = _freed_mib(True, env)
    assert changed == "True" and released < 8  # kept for the next tensor
    changed, released = _freed_mib(True, {**env, "MALLOC_TRIM_THRESHOLD_": "0"})
    assert changed == "False" and released > 200  # the environment's choice stands


RELEASE = """
import os, sys
from convscope.cpu import keep_freed_memory, release_freed_memory, resident_memory
import torch
keep_freed_memory()
x = torch.ones(64, 1024, 1024)  # 256 MiB, written
before = resident_memory()[0]
del x
kept = resident_memory()[0]
release_freed_memory()
print((before - kept) / 2**20, (before - resident_memory()[0]) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_released_memory_leaves_the_process_between_steps():
    """With freed memory kept (as every command runs), what a step freed stays resident until released: the
    demo releases it after each step, so one step's peak does not stay under the next."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True, env=env)
    kept_back, released = map(float, out.stdout.split())
    assert kept_back < 8 and released > 200


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, shape", [
    (3, 2, 0, True, (4, 5, 15, 15)),  # zfnet's pools: overlapping, ceil mode (a last window past the edge)
    (3, 2, 1, False, (2, 3, 9, 12)),
    (2, 2, 0, False, (3, 4, 8, 8)),
    ((3, 2), (1, 2), (1, 0), True, (2, 6, 7, 10)),
])
def test_channels_last_pooling_gives_pytorchs_outputs_and_gradients_bit_for_bit(kernel, stride, padding, ceil_mode,
                                                                                  shape):
    import torch
    import torch.nn.functional as F
    from torch import nn

    from convscope.cpu import channels_last_pooling

    g = torch.Generator().manual_seed(0)
    # rectified values from a handful of levels: windows of zeros and windows with tied positive maxima, where
    # which index a kernel keeps decides where the gradient goes
    x = torch.relu(torch.randint(-3, 4, shape, generator=g).float() * 0.5)
    grad = torch.randn(F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode).shape, generator=g)
    pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    outs, grads = [], []
    for fast in (False, True):
        leaf = x.clone().requires_grad_()
        with channels_last_pooling() if fast else contextlib.nullcontext():
            y = pool(leaf)
        assert ("ChannelsLast" in type(y.grad_fn).__name__) == fast  # the mode took the pool, and only in it
        y.backward(grad)
        outs.append(y.detach())
        grads.append(leaf.grad)
    assert outs[1].is_contiguous() and torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    assert (grads[0] != 0).any()


def test_training_steps_under_channels_last_pooling_are_bit_identical():
    """zfnet_small, SGD steps with dropout: every weight equal to the last bit with and without the mode."""
    import torch
    import torch.nn.functional as F

    from convscope import create_model
    from convscope.cpu import channels_last_pooling

    weights = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = create_model("zfnet_small", 5).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.rand(16, 3, 64, 64, generator=g), torch.randint(0, 5, (16,), generator=g)
            with channels_last_pooling() if fast else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
