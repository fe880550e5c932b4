"""lorakit.heap: with glibc's mmap threshold fixed at 4 MB, blocks over it that are freed go back
to the system; at the 16 MB glibc's own threshold rises to after a training step frees a
dequantized weight, the heap keeps them (small live blocks between them pin it). Each case
runs in a fresh process (the setting is process-wide); a threshold the user set is kept."""

import os
import subprocess
import sys

import pytest

PROBE = """
import torch
from lorakit.heap import fix_mmap_threshold
fixed = fix_mmap_threshold()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
blocks, pins = [], []
for _ in range(30):  # 6 MB blocks with small live ones between them
    blocks.append(torch.ones(1_500_000))
    pins.append(torch.ones(100_000))  # 400 KB: from the top of the heap, after the block
del blocks
pinned = sum(p.nbytes for p in pins)
print(fixed, (rss() - before - pinned) / 2**20)
"""


def held(env: dict) -> tuple[str, float]:
    """(whether lorakit fixed the threshold, MB the process still holds of 180 MB freed)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_freed_blocks_go_back_to_the_system_with_the_threshold_fixed():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    fixed, kept = held(env)
    if fixed != "True":
        pytest.skip("this C library has no mallopt (not glibc)")
    assert kept < 5  # mapped, and unmapped when freed
    fixed, kept = held({**env, "MALLOC_MMAP_THRESHOLD_": str(16 * 2**20)})
    assert fixed == "False"  # the user's setting is kept ...
    assert kept > 100  # ... and with it the heap holds on to what was freed
