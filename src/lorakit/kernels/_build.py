"""Building and loading the compiled CPU kernels: one shared library from this folder's C files.

Every C file here (one per kernel, and the header they share) is compiled at first use in one
call of the system C compiler (`$CC`, else `cc` or `gcc`) for this CPU (`-march=$LORAKIT_MARCH`,
default `native`; CI sets `x86-64-v3` to test the AVX2 variant) and loaded with ctypes: no build
step at install, no PyTorch headers. The library is cached in `$LORAKIT_CACHE`, else
`$XDG_CACHE_HOME/lorakit`, else `~/.cache/lorakit`, else (none of those writable) a folder of
this user's under the temp folder; keyed by the sources, the compiler, the flags and the CPU.
A lock keeps two threads, and a lock file two processes, from building at once.

Where the kernels are off `library()` is None and every wrapper returns None or False, so that
its caller keeps the PyTorch path. Quietly where that is the normal path (`LORAKIT_NF4_KERNEL=0`,
not x86-64, a CPU without AVX2); with one RuntimeWarning per process where something is wrong
(no C compiler, no writable cache folder, a failed build). Nothing here raises.
"""

from __future__ import annotations

import ctypes
import functools
import getpass
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no lock between processes (the rename still keeps builds whole)
    fcntl = None

FOLDER = Path(__file__).parent  # the kernels' C files and their header
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")  # and -march=
KEEP_BUILDS = 4  # other lorakit versions or compilers sharing the cache keep theirs a while
BUILD_SECONDS = 300
OFF_SWITCH = "LORAKIT_NF4_KERNEL"

ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

_LOCK = threading.Lock()  # library() from two threads at once: one builds, the other waits
_warned = False  # the one warning per process is given


class _Off(Exception):
    """Why the kernels are off: the warning's reason."""


def _flags() -> list[str]:
    return [*FLAGS, f"-march={os.environ.get('LORAKIT_MARCH') or 'native'}"]


def _compiler() -> list[str] | None:
    """The C compiler's command: $CC (it may hold arguments: "ccache gcc"), else cc or gcc."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _compiler_identity(program: str) -> str:
    """The compiler's resolved path, size and time: an upgraded compiler builds anew."""
    found = shutil.which(program)
    if found is None:
        return program
    info = os.stat(found)
    return f"{os.path.realpath(found)} {info.st_size} {info.st_mtime_ns}"


def _cpu_signature() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _sources() -> list[Path]:
    return sorted(FOLDER.glob("*.c"))


def _library_name(compiler: list[str]) -> str:
    key = hashlib.sha256()
    for path in [*_sources(), *sorted(FOLDER.glob("*.h"))]:
        key.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    parts = [*compiler, _compiler_identity(compiler[0]), *_flags(), _cpu_signature()]
    key.update("\0".join(parts).encode())
    return f"kernels-{key.hexdigest()[:16]}.so"


def cache_folders() -> list[tuple[Path, bool]]:
    """Where builds are cached, in order, each with whether it is under the shared temp folder:
    the configured folder, then this user's folder under the temp folder."""
    env = os.environ
    folders = []
    if env.get("LORAKIT_CACHE"):
        folders.append((Path(env["LORAKIT_CACHE"]), False))
    elif env.get("XDG_CACHE_HOME"):
        folders.append((Path(env["XDG_CACHE_HOME"]) / "lorakit", False))
    else:
        with suppress(RuntimeError):  # no home directory: only the temp folder
            folders.append((Path.home() / ".cache" / "lorakit", False))
    try:
        user = str(os.getuid()) if hasattr(os, "getuid") else getpass.getuser()
    except Exception:  # getuser: no name in the environment or the password database
        user = "user"
    folders.append((_temp_folder() / f"lorakit-{user}", True))
    return folders


def _temp_folder() -> Path:
    return Path(tempfile.gettempdir())


def _private(folder: Path) -> bool:
    """Whether a folder under the shared temp folder is this user's own directory and closed to
    others: what is in it gets loaded into this process."""
    if not hasattr(os, "getuid"):
        return True
    info = os.lstat(folder)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _writable(folder: Path, shared: bool) -> bool:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if shared and not _private(folder):
            return False
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _library_path(compiler: list[str]) -> Path:
    """The library: found in a cache folder, else built in the first writable one."""
    name = _library_name(compiler)
    tried = []
    for folder, shared in cache_folders():
        path = folder / name
        try:
            if path.is_file() and (not shared or _private(folder)):
                return path
        except OSError:
            pass
        if _writable(folder, shared):
            return _build(compiler, path)
        tried.append(str(folder))
    raise _Off(f"no cache folder can be written (tried {', '.join(tried)}; set LORAKIT_CACHE)")


@contextmanager
def _process_lock(path: Path) -> Iterator[None]:
    """Held by one process at a time, released by the system if the process dies."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def _build(compiler: list[str], path: Path) -> Path:
    """Compile every C file here into `path`, unless another process did while this one waited
    for the lock. Written under a temporary name, then renamed: never seen half-written."""
    with _process_lock(path.parent / "build.lock"):
        if path.is_file():
            return path
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        try:
            _compile([*compiler, *_flags(), "-o", str(tmp), *map(str, _sources()), "-lm"])
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _prune(path)
    return path


def _compile(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, timeout=BUILD_SECONDS)
    except subprocess.TimeoutExpired:
        raise _Off(f"the build took over {BUILD_SECONDS} s") from None
    except OSError as exc:  # not there, not executable
        raise _Off(f"the C compiler {command[0]!r} cannot run ({exc})") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()[:6]
        raise _Off("the build failed:\n" + "\n".join(line[:200] for line in lines))


def _prune(newest: Path) -> None:
    """Remove all but the KEEP_BUILDS most recent builds (one per source change otherwise
    piles up, and nf4_matmul-*.so are earlier versions'); a library already loaded by a
    running process stays usable once unlinked."""
    try:
        builds = [*newest.parent.glob("kernels-*.so"), *newest.parent.glob("nf4_matmul-*.so")]
        builds.sort(key=lambda p: p.stat().st_mtime)
        for old in builds[:-KEEP_BUILDS]:
            if old != newest:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # another process pruned the same folder meanwhile


def _warn(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        # pointing at the first caller outside this folder: the code that used a kernel
        level, frame = 1, sys._getframe()
        while frame is not None and Path(frame.f_code.co_filename).parent == FOLDER:
            level, frame = level + 1, frame.f_back
        warnings.warn(
            f"lorakit's compiled CPU kernels are off: {reason}\nlorakit runs its slower PyTorch "
            f"path instead. Set {OFF_SWITCH}=0 to silence this warning.",
            RuntimeWarning,
            stacklevel=level,
        )


@functools.cache
def _load() -> ctypes.CDLL | None:
    if os.environ.get(OFF_SWITCH, "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None  # the PyTorch path is the normal one there: no warning
    try:
        compiler = _compiler()
        if compiler is None:
            raise _Off("no C compiler found (install gcc or clang, or set CC)")
        lib = ctypes.CDLL(str(_library_path(compiler)))
        return lib if lib.lk_nf4_lanes() else None  # built without AVX2: PyTorch is faster
    except _Off as off:
        _warn(str(off))
    except Exception as exc:  # a forward pass must not fail because of the cache or the build
        _warn(f"{type(exc).__name__}: {exc}")
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they are off, cannot be built or cannot run here."""
    with _LOCK:
        return _load()


def reset() -> None:
    """Forget the loaded library, its functions and the warning given: the next `library()`
    looks again (for tests, after changing LORAKIT_* variables)."""
    global _warned
    with _LOCK:
        _load.cache_clear()
        function.cache_clear()
        _warned = False


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
