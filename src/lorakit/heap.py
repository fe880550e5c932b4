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
"""

from __future__ import annotations

import ctypes
import functools
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
THRESHOLD = 4 * 2**20


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
