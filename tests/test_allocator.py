"""The allocator setting of every convscope command: freed large blocks stay in the process (and are reused)
rather than going back to the kernel; nothing changes where the environment already chose."""

import subprocess
import sys

import pytest

PROBE = """
import os, sys, torch
from convscope.allocator import keep_freed_memory
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
