"""Atomic file writes: a file is either the old one or the complete new one, never half-written;
and the check that an output directory can be written before any slow work begins."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import LorakitError


def fix_for(e: OSError) -> str:
    """What to do about a failed write, from its errno."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some disk space"
    return "choose a writable place"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise LorakitError(f"could not write {path}: {e.strerror or e}; {fix_for(e)}") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 would hide it from other users
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data on disk before the name points at it
        os.replace(tmp, path)
        sync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise LorakitError(f"could not write {path}: {e.strerror or e}; {fix_for(e)}") from None
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        if type(e).__name__ != "SafetensorError":  # safetensors' own wrap of a failed write
            raise
        full = "os error 28" in str(e) or "No space left" in str(e)
        fix = "free some disk space" if full else "choose a writable place"
        raise LorakitError(f"could not write {path}: {e}; {fix}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read once, at import: setting it is not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def sync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the system lets a directory be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) for a hidden folder beside `out` (which must be absent or empty), then
    rename it to `out`; on any failure the folder is removed and a write error is reported
    with its fix: a directory is either not there or complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the model is not
    try:
        write(tmp)
        if out.is_dir():
            out.rmdir()  # empty (check_new_dir): rename cannot replace a directory otherwise
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorakitError(f"could not write {out}: {e.strerror or e}; {fix_for(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def check_can_create(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, creating nothing, a directory `path` that cannot be made or written: a file in
    the way, or a nearest existing folder that refuses new files (tried with a real file, since
    permission bits say nothing to root, nor of read-only or virtual file systems)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = f"{flag} {path}" if existing == path else f"{flag} {path}: {existing}"
        raise LorakitError(f"{where} is a file; choose a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lorakit-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "write into" if existing == path else "create"
        raise LorakitError(
            f"cannot {what} {flag} {path} ({existing}: {e.strerror or e}); "
            "choose a writable directory"
        ) from None


def make_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create directory `path` (and its parents), checked as `check_can_create` does."""
    path = Path(path)
    check_can_create(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LorakitError(
            f"cannot create {flag} {path} ({e.strerror or e}); choose a writable directory"
        ) from None
    return path


def check_new_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, creating nothing, an output directory that exists and is not empty (its files
    would be lost) or that cannot be created (`check_can_create`)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()):
        raise LorakitError(f"{flag} {path} exists and is not empty; choose a new directory")
    check_can_create(path, flag)
