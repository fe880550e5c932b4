"""Building and loading the compiled CPU kernels: one shared library from this folder's C files.

The C sources are compiled at first use with the system C compiler (`$CC`, else `cc` or `gcc`)
for this CPU (`-march=native`) and loaded with ctypes: no build step at install, no PyTorch
headers. The library is cached, keyed by the sources, the compiler, the flags and the CPU.
Where it cannot be built or run (no C compiler, a CPU without AVX2, not x86-64,
`LORAKIT_NF4_KERNEL=0`) `library()` is None and every kernel's wrapper returns None or False, so
its caller keeps the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

FOLDER = Path(__file__).parent  # the kernels' C files (one per kernel) and their header
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
KEEP_BUILDS = 4  # other lorakit versions or compilers sharing the cache keep theirs a while

ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def _cpu_signature() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build(cc: str) -> Path | None:
    sources = sorted(FOLDER.glob("*.c"))
    texts = [p.read_bytes() for p in [*sources, *sorted(FOLDER.glob("*.h"))]]
    key = hashlib.sha256(b"\0".join([*texts, cc.encode(), " ".join(FLAGS).encode()]))
    key.update(_cpu_signature().encode())
    path = cache_dir() / f"nf4_matmul-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")  # renamed into place when complete
    try:
        done = subprocess.run(
            [cc, *FLAGS, "-o", str(tmp), *map(str, sources), "-lm"],
            capture_output=True,
            timeout=300,
        )
        if done.returncode != 0:
            return None
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        tmp.unlink(missing_ok=True)
    _prune(path)
    return path


def _prune(newest: Path) -> None:
    """Remove all but the KEEP_BUILDS most recent builds (one per source change otherwise
    piles up); a library already loaded by a running process stays usable once unlinked."""
    builds = sorted(newest.parent.glob("nf4_matmul-*.so"), key=lambda p: p.stat().st_mtime)
    for old in builds[:-KEEP_BUILDS]:
        if old != newest:
            old.unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they are off, cannot be built or cannot run here."""
    if os.environ.get("LORAKIT_NF4_KERNEL", "1") == "0" or platform.machine() not in (
        "x86_64",
        "AMD64",
    ):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    path = _build(cc) if cc else None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    if lib.lk_nf4_lanes() == 0:  # compiled without AVX2: slower than PyTorch's path
        return None
    return lib


@functools.cache
def function(name: str, *argtypes: type) -> ctypes._CFuncPtr | None:
    """The library's C function `name` taking `argtypes` and returning an int status (0: done),
    or None where the library is not there."""
    lib = library()
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def threads() -> int:
    """Threads for a kernel's parallel loops: what torch.set_num_threads chose."""
    return torch.get_num_threads()


def bf16_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
