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
(`TUNABLES`), 0.06 GB free and 1.80 GiB. No slower: a step 4.7 s with them off against 5.4 s
with them on, generation at batch 1 94.7 against 85.0 tokens/s (BENCHMARKS.md). glibc (2.26 and
later) reads these settings only when a process starts, so the `lorakit train` and `lorakit
serve` commands start again in place with them (`restart_with_tuned_heap`, about a second of
imports more), then put the environment back for the processes they start. The Python API and
`cli.main(argv)` never restart; a script gets the same by setting GLIBC_TUNABLES itself.
LORAKIT_HEAP=off keeps glibc's defaults; a preloaded allocator (jemalloc, tcmalloc, mimalloc) is
left alone.
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
OPT_OUT = "LORAKIT_HEAP"  # off (or 0): keep glibc's defaults
RESTARTED = "_LORAKIT_HEAP_RESTARTED"  # in the restarted process: the GLIBC_TUNABLES it had before
UNSET = "-"  # ... where it had none


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
    """`environ` with `TUNABLES` added to GLIBC_TUNABLES (any the user set are theirs and kept),
    or None where there is nothing to do: not glibc 2.26 or later, another allocator preloaded,
    restarted already, LORAKIT_HEAP=off, or every one of them set by the user."""
    if RESTARTED in environ or environ.get(OPT_OUT, "").lower() in ("off", "0") or not _glibc():
        return None
    if any(lib in environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    before = environ.get("GLIBC_TUNABLES")
    own = [t for t in (before or "").split(":") if t]
    names = {t.split("=", 1)[0] for t in own}
    added = [f"{k}={v}" for k, v in TUNABLES.items() if k not in names]
    if not added:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(own + added), RESTARTED: before or UNSET}


def launched_as_command() -> bool:
    """Whether this process is the `lorakit` command itself (pip's console script, or `python -m
    lorakit`), so that running it again runs only lorakit: not a notebook, debugger, profiler or
    script that calls `main` with sys.argv set."""
    argv, orig = sys.argv, getattr(sys, "orig_argv", [])
    if getattr(sys, "frozen", False) or not sys.executable or len(orig) < len(argv):
        return False
    if orig[len(orig) - len(argv) + 1 :] != argv[1:]:
        return False
    launcher = orig[: len(orig) - len(argv) + 1]
    if launcher[-2:] == ["-m", "lorakit"]:
        return True
    script = os.path.basename(argv[0])
    return script in ("lorakit", "lorakit.exe") and os.path.basename(launcher[-1]) == script


def restart_with_tuned_heap() -> None:
    """Run this command again, in place (the same PID), with `tuned_environ`; returns where there
    is nothing to do or the restart fails. In the restarted process, puts GLIBC_TUNABLES back as
    it was (glibc has read it), so that the processes it starts (a compiler, workers) run with
    glibc's defaults."""
    before = os.environ.pop(RESTARTED, None)
    if before is not None:
        if before == UNSET:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = before
        return
    env = tuned_environ(os.environ)
    if env is None or not launched_as_command():
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # run on with glibc's defaults


def _glibc() -> bool:
    """glibc 2.26 or later (GLIBC_TUNABLES came with 2.26)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(x) for x in version.split(".")[:2])
    except (AttributeError, ValueError, OSError, TypeError):
        return False  # not a C library that answers this: not glibc
    return name == "glibc" and (major, minor) >= (2, 26)
