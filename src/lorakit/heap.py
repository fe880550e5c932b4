"""glibc's heap, kept from holding on to what a training step frees.

glibc serves an allocation from its heap unless it is larger than its mmap threshold, which
starts at 128 KB and rises, each time a mapped block is freed, to that block's size (up to
32 MB). A step frees dequantized weights of tens of MB, after which every activation below that
size comes from the heap, where fragmentation keeps the memory after it is freed. A 1.1B LLaMA
step with gradient checkpointing (512 tokens) ended its forward pass holding 1.07 GB more than
it started with, about 48 MB a layer, where the activations it keeps are 4 MB a layer; with the
threshold fixed at 4 MB it held 0.15 GB more, and the step's peak RSS went from 2.96 to 2.05 GB
for the same step time (64.9 vs 63.7 s; 256 KB: 1.99 GB, 67.8 s). Fixing the threshold stops
the rise: blocks over 4 MB are mapped and go back to the system when freed.

Below the threshold, glibc keeps small freed blocks in per-thread caches (tcache) and fast bins,
still marked in use, so the freed blocks around them cannot merge into larger ones. A forward
pass that allocates and frees temporaries of a few MB between small blocks that live on
(saved tensors' metadata, LoRA's x @ A) then leaves each layer's temporaries as holes the next
layer's cannot use: SmolLM2 in fp32 (PyTorch's own operations), 512 tokens, ended its forward
pass with 0.44 GB free in a 1.59 GB heap and peaked at 2.24 GiB; with both caches off
(`TUNABLES`), 0.06 GB free and 1.80 GiB, at the same speed (4.7 vs 5.4 s a step, generation
94.7 vs 85.0 tokens/s). glibc reads these settings only when a process starts, so `lorakit
train` and `lorakit serve` start again with them (`restart_with_tuned_heap`); a script using
the Python API gets them by setting GLIBC_TUNABLES itself. LORAKIT_HEAP=off (any value) keeps
glibc's defaults.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
THRESHOLD = 4 * 2**20
TUNABLES = {"glibc.malloc.tcache_count": "0", "glibc.malloc.mxfast": "0"}
MARK = "LORAKIT_HEAP"  # set in the restarted process; set it yourself to keep glibc's defaults


@functools.cache
def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at THRESHOLD for this process, once; False where the C
    library has no mallopt (macOS, Windows) or refuses it, or where the user set
    MALLOC_MMAP_THRESHOLD_ (theirs is kept)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with `TUNABLES` added to GLIBC_TUNABLES (the user's own entries kept, theirs
    first for a name both set), or None where there is nothing to do: not glibc, already
    restarted or kept off (`MARK` set), or every one of them set by the user already."""
    if MARK in environ or not _glibc():
        return None
    own = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in own}
    added = [f"{k}={v}" for k, v in TUNABLES.items() if k not in names]
    if not added:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(own + added), MARK: "tuned"}


def restart_with_tuned_heap() -> None:
    """Run this process's command again, in place (same PID), with `tuned_environ`; returns
    only where there is nothing to do."""
    env = tuned_environ(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False  # not a C library that answers this: not glibc
