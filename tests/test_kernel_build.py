"""kernels._build: one library from the kernels' C files, cached and built once under a lock;
where it cannot be built, None, one RuntimeWarning, and the PyTorch path runs everywhere."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import needs_kernel, tiny_model

from lorakit.kernels import _build

REAL = _build.library()  # loaded from the real cache, before any test here resets it


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process as it starts (no library loaded, no warning given), caching in tmp_path/cache;
    afterwards the next library() loads the real one again."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAKIT_NF4_KERNEL", raising=False)
    _build.reset()
    yield tmp_path / "cache"
    _build.reset()


@pytest.fixture
def compiles(monkeypatch):
    """The compiler commands run (the real compiler still runs them)."""
    done = []
    real = _build._compile
    monkeypatch.setattr(_build, "_compile", lambda command: done.append(command) or real(command))
    return done


def _copying_compiler(monkeypatch, source: Path, done: list, seconds: float = 0.0) -> None:
    """A stand-in for the compiler that writes the real library where it was asked to."""

    def compile_(command: list[str]) -> None:
        done.append(command)
        time.sleep(seconds)
        Path(command[command.index("-o") + 1]).write_bytes(source.read_bytes())

    monkeypatch.setattr(_build, "_compile", compile_)


def _off_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("compiler", ["fails", "missing", "none"])
def test_no_compiler_or_a_failed_build_gives_none_and_one_warning(
    compiler, fresh, monkeypatch, tmp_path
):
    script = tmp_path / "cc"
    script.write_text("#!/bin/sh\necho 'cc: error: broken on purpose' >&2\nexit 1\n")
    script.chmod(0o755)
    if compiler == "none":
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    else:
        monkeypatch.setenv("CC", str(script) if compiler == "fails" else "/nonexistent/cc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _build.library() is None
        assert _build.function("lk_rms_norm") is None
        _build._load.cache_clear()  # looking again in the same process warns no more
        assert _build.library() is None
    (message,) = _off_warnings(caught)
    reason = {"fails": "broken on purpose", "missing": "/nonexistent/cc", "none": "no C compiler"}
    assert reason[compiler] in message
    assert "PyTorch path" in message and "LORAKIT_NF4_KERNEL=0" in message
    assert not [p for p in fresh.glob("*") if p.name != "build.lock"]  # nothing half-written


@pytest.mark.parametrize("switch", ["off", "not x86-64"])
def test_the_switch_and_other_machines_give_none_quietly(switch, fresh, monkeypatch, compiles):
    if switch == "off":
        monkeypatch.setenv("LORAKIT_NF4_KERNEL", "0")
    else:
        monkeypatch.setattr(_build.platform, "machine", lambda: "aarch64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _build.library() is None
    assert compiles == []


def _twice_at_once(call: Callable[[], object]) -> list:
    """call() from two threads released together; what each returned."""
    barrier, got = threading.Barrier(2), []

    def run() -> None:
        barrier.wait()
        got.append(call())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


@needs_kernel
def test_two_threads_build_once_and_the_build_is_reused(fresh, compiles):
    got = _twice_at_once(_build.library)
    assert len(compiles) == 1 and got[0] is not None and got[0] is got[1]
    (built,) = fresh.glob("kernels-*.so")
    assert sorted(p.name for p in fresh.iterdir()) == sorted(["build.lock", built.name])
    _build.reset()  # a new process: loads the cached build
    assert _build.library()._name == str(built) and len(compiles) == 1


@needs_kernel
def test_two_processes_build_once(fresh, monkeypatch):
    """The lock file: a build that waited for another's finds its library and does not compile
    (flock locks each open file, so two threads stand in for two processes)."""
    done = []
    _copying_compiler(monkeypatch, Path(REAL._name), done, seconds=0.3)
    fresh.mkdir()
    path = fresh / "kernels-test.so"
    assert _twice_at_once(lambda: _build._build(["cc"], path)) == [path, path]
    assert len(done) == 1


@needs_kernel
def test_an_unwritable_cache_falls_back_to_the_temp_folder(fresh, monkeypatch, tmp_path):
    done = []
    _copying_compiler(monkeypatch, Path(REAL._name), done)
    monkeypatch.setenv("LORAKIT_CACHE", "/proc/lorakit-cache")  # cannot be made, even by root
    monkeypatch.setattr(_build, "_temp_folder", lambda: tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = _build.library()
    assert lib is not None and len(done) == 1
    assert Path(lib._name).parent == tmp_path / f"lorakit-{os.getuid()}"


def test_a_temp_folder_open_to_others_is_not_used(fresh, monkeypatch, tmp_path, compiles):
    monkeypatch.setenv("LORAKIT_CACHE", "/proc/lorakit-cache")
    monkeypatch.setattr(_build, "_temp_folder", lambda: tmp_path)
    shared = tmp_path / f"lorakit-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could have put a library there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _build.library() is None
    (message,) = _off_warnings(caught)
    assert "no cache folder can be written" in message and compiles == []


def test_with_no_writable_folder_a_model_still_runs(fresh, monkeypatch, tmp_path):
    from lorakit.models.loading import load_model

    monkeypatch.setenv("LORAKIT_CACHE", "/proc/lorakit-cache")
    monkeypatch.setattr(_build, "_temp_folder", lambda: Path("/proc/lorakit-tmp"))
    tiny_model("llama").save_pretrained(tmp_path / "model")
    ids = torch.tensor([[1, 5, 9]])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model, _, _ = load_model(
            tmp_path / "model", quant="nf4", dtype=torch.bfloat16, with_tokenizer=False
        )
        logits = model.eval()(ids).logits  # 3 rows: NF4Linear's decoding path asks for the kernel
    (message,) = _off_warnings(caught)
    assert "no cache folder can be written" in message and "/proc/lorakit-cache" in message
    assert logits.shape == (1, 3, 400) and logits.isfinite().all()


def test_the_cache_folders_in_order(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "_temp_folder", lambda: tmp_path / "tmp")
    shared = (tmp_path / "tmp" / f"lorakit-{os.getuid()}", True)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _build.cache_folders() == [(tmp_path / "mine", False), shared]
    monkeypatch.delenv("LORAKIT_CACHE")
    assert _build.cache_folders() == [(tmp_path / "xdg" / "lorakit", False), shared]
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _build.cache_folders() == [(tmp_path / "home" / ".cache" / "lorakit", False), shared]


def test_the_target_cpu_is_a_setting_and_part_of_the_key(monkeypatch):
    monkeypatch.delenv("LORAKIT_MARCH", raising=False)
    native = _build._library_name(["cc"])
    assert "-march=native" in _build._flags()
    monkeypatch.setenv("LORAKIT_MARCH", "x86-64-v3")
    assert "-march=x86-64-v3" in _build._flags()
    assert _build._library_name(["cc"]) != native


def test_old_builds_beyond_the_newest_few_are_pruned(fresh, monkeypatch, tmp_path):
    source = tmp_path / "fake.so"
    source.write_bytes(b"not a library")
    _copying_compiler(monkeypatch, source, [])
    fresh.mkdir()
    for i in range(6):  # earlier builds: other sources, and an earlier lorakit's names
        old = fresh / (f"kernels-old{i}.so" if i % 2 else f"nf4_matmul-old{i}.so")
        old.write_bytes(b"")
        os.utime(old, (i, i))
    built = _build._build(["cc"], fresh / "kernels-new.so")
    names = sorted(p.name for p in fresh.glob("*.so"))
    assert names == sorted([built.name, "kernels-old3.so", "nf4_matmul-old4.so", "kernels-old5.so"])
