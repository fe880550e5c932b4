"""A compiled NF4 matmul for generation: y = x @ W.T read straight from the 4-bit codes.

Each new token reads every weight once, so decoding is bound by memory traffic; from the 4-bit
codes that is a quarter of a bf16 copy's. `nf4_matmul.c` (AVX-512 or AVX2, OpenMP) is compiled
at first use with the system C compiler into the user cache (`$LORAKIT_CACHE`, else
`~/.cache/lorakit`) and loaded with ctypes: no build step at install, no PyTorch headers. Where
it cannot run (no C compiler, a CPU without AVX2, a shape it does not take, a GPU tensor)
`supports` says False and callers keep the PyTorch path. `LORAKIT_NF4_KERNEL=0` turns it off.
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
from torch import Tensor

from lorakit.nf4 import NF4_CODE, NF4State

SOURCE = Path(__file__).with_name("nf4_matmul.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
_CODE = torch.tensor(NF4_CODE, dtype=torch.float32)
LoRA = tuple[Tensor, Tensor, float]  # A (rank, in), B (out, rank), scale


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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(FLAGS).encode()]))
    key.update(_cpu_signature().encode())
    path = cache_dir() / f"nf4_matmul-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")  # renamed into place when complete
    try:
        done = subprocess.run(
            [cc, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, timeout=300
        )
        if done.returncode != 0:
            return None
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it is off, cannot be built or cannot run here."""
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
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.lk_nf4_matmul.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64]
    lib.lk_nf4_matmul.argtypes += [ctypes.c_float, ptr, i64, ptr, ctypes.c_int]
    lib.lk_nf4_matmul.argtypes += [ptr, ptr, i64, ctypes.c_float]  # an adapter to add, or None
    lib.lk_nf4_matmul.argtypes += [ctypes.c_int]  # x is bf16: products may run in bf16
    lib.lk_nf4_matmul.restype = ctypes.c_int
    return lib


def supports(state: NF4State, device: torch.device) -> bool:
    """Whether `nf4_matmul` can run this weight (a 2-D CPU weight whose rows hold whole
    blocks of a multiple of 32 elements) on this machine."""
    return (
        device.type == "cpu"
        and state.packed.device.type == "cpu"
        and state.packed.dtype == torch.uint8
        and state.absmax.dtype == (torch.uint8 if state.double_quant else torch.float32)
        and len(state.shape) == 2
        and state.blocksize % 32 == 0
        and state.shape[1] % state.blocksize == 0
        and library() is not None
    )


class KernelWeight:
    """One weight's kernel arguments, prepared once: a decoding step calls each layer hundreds
    of times a second, so per call only the activations are converted."""

    def __init__(self, state: NF4State) -> None:
        lib = library()
        assert lib is not None and supports(state, state.packed.device)
        self.call, self.shape = lib.lk_nf4_matmul, state.shape
        dq = state.double_quant
        # Held here for as long as the pointers below are used.
        self.tensors = [state.packed.contiguous(), state.absmax.contiguous()]
        if dq:
            self.tensors += [state.absmax_code.float().contiguous()]
            self.tensors += [state.absmax_scale.float().contiguous()]
        ptr = [t.data_ptr() for t in self.tensors]
        absmax = (None, ptr[1], ptr[2], ptr[3]) if dq else (ptr[1], None, None, None)
        self.args = (ptr[0], _CODE.data_ptr(), *state.shape, state.blocksize, *absmax)
        self.args += (state.blocksize2, state.offset or 0.0)

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied layer has other buffers: it prepares its own call when used

    def __call__(self, x: Tensor, dtype: torch.dtype, lora: LoRA | None = None) -> Tensor:
        """x (..., in) @ W.T -> (..., out) in `dtype`, accumulated in float32; plus
        scale * (x @ A.T) @ B.T for `lora` = (A, B, scale), float32 contiguous A and B."""
        n_out, n_in = self.shape
        rows = x.reshape(-1, n_in).float().contiguous()
        y = torch.empty(rows.shape[0], n_out, dtype=torch.float32)
        args = (rows.data_ptr(), rows.shape[0], y.data_ptr(), torch.get_num_threads())
        bf16 = int(x.dtype == dtype == torch.bfloat16)  # nothing of x lost in bf16 products
        if lora is None:
            args += (None, None, 0, 0.0)
        else:
            a, b, scale = lora
            assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
            assert a.shape == (b.shape[1], n_in) and b.shape[0] == n_out
            args += (a.data_ptr(), b.data_ptr(), a.shape[0], scale)
        if self.call(*self.args, *args, bf16) != 0:
            raise RuntimeError(f"the NF4 kernel refused a {tuple(self.shape)} weight")
        return y.to(dtype).view(*x.shape[:-1], n_out)


def nf4_matmul(x: Tensor, state: NF4State, dtype: torch.dtype, lora: LoRA | None = None) -> Tensor:
    """x (..., in) @ W.T (+ the adapter) in `dtype`, accumulated in float32. Check `supports`."""
    return KernelWeight(state)(x, dtype, lora)
