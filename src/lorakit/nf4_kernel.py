"""A compiled NF4 matmul for generation: y = x @ W.T read straight from the 4-bit codes.

Each new token reads every weight once, so decoding is bound by memory traffic; from the 4-bit
codes that is a quarter of a bf16 copy's. `nf4_matmul.c` (AVX-512 or AVX2, OpenMP) is compiled
at first use with the system C compiler into the user cache (`$LORAKIT_CACHE`, else
`~/.cache/lorakit`) and loaded with ctypes: no build step at install, no PyTorch headers. Where
it cannot run (no C compiler, a CPU without AVX2, a shape it does not take, a GPU tensor)
`supports` says False and callers keep the PyTorch path. `LORAKIT_NF4_KERNEL=0` turns it off.
The same library holds the rest of a bf16 decoding step (RMSNorm, rotary embedding with the
KV cache write, one query's attention, greedy argmax) and the training loss's softmax
cross-entropy over bf16 logits.
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

from lorakit.nf4 import NF4_CODE, NF4State, block_absmax

SOURCE = Path(__file__).with_name("nf4_matmul.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
_CODE = torch.tensor(NF4_CODE, dtype=torch.float32)
LoRA = tuple[Tensor, Tensor, float]  # A (rank, in), B transposed (rank, out), scale


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
            [cc, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, timeout=300
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


KEEP_BUILDS = 4  # other lorakit versions or compilers sharing the cache keep theirs a while


def _prune(newest: Path) -> None:
    """Remove all but the KEEP_BUILDS most recent builds (one per source change otherwise
    piles up); a library already loaded by a running process stays usable once unlinked."""
    builds = sorted(newest.parent.glob("nf4_matmul-*.so"), key=lambda p: p.stat().st_mtime)
    for old in builds[:-KEEP_BUILDS]:
        if old != newest:
            old.unlink(missing_ok=True)


class _Weight(ctypes.Structure):
    """nf4_matmul.c's nf4_weight: what stays the same from call to call."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("code", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("n_out", ctypes.c_int64),
        ("n_in", ctypes.c_int64),
        ("bs", ctypes.c_int64),
    ]


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
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # weight, x, x is bf16, rows, y, y is bf16, threads, then an adapter to add (or None),
    # then whether the products may run in bf16
    lib.lk_nf4_matmul.argtypes = [ctypes.POINTER(_Weight), ptr, i32, i64, ptr, i32, i32]
    lib.lk_nf4_matmul.argtypes += [ptr, ptr, i64, ctypes.c_float, i32]
    lib.lk_nf4_matmul.restype = i32
    # n, weights, x, x is bf16, rows, outputs, y is bf16, threads, adapters' A, B, ranks, scales,
    # whether the products may run in bf16
    lib.lk_nf4_matmul_n.argtypes = [i64, ptr, ptr, i32, i64, ptr, i32, i32, ptr, ptr, ptr, ptr, i32]
    lib.lk_nf4_matmul_n.restype = i32
    # weight, out, in, x, x is bf16, rows, y, y is bf16, threads
    lib.lk_bf16_matmul.argtypes = [ptr, i64, i64, ptr, i32, i64, ptr, i32, i32]
    lib.lk_bf16_matmul.restype = i32
    lib.lk_nf4_dequantize.argtypes = [ctypes.POINTER(_Weight), ptr, i32, i32]  # out, bf16
    lib.lk_nf4_dequantize.restype = i32
    # x, rows, n, weight, eps, out
    lib.lk_rms_norm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
    lib.lk_rms_norm.restype = i32
    # dy, x, rows, n, weight, eps, dx
    lib.lk_rms_norm_backward.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_float, ptr]
    lib.lk_rms_norm_backward.restype = i32
    lib.lk_causal_softmax_bf16.argtypes = [ptr, i64, i64, i64]  # scores, rows, n, window
    lib.lk_causal_softmax_bf16.restype = i32
    # x, batch, t, heads, d, cos, sin, cos/sin batch stride (in rows of t), out, backward
    lib.lk_rope_bf16.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, i32]
    lib.lk_rope_bf16.restype = i32
    lib.lk_swiglu.argtypes = [ptr, ptr, i64, ptr]  # g, u, n, h
    lib.lk_swiglu.restype = i32
    lib.lk_swiglu_backward.argtypes = [ptr, ptr, ptr, i64, ptr, ptr]  # dh, g, u, n, dg, du
    lib.lk_swiglu_backward.restype = i32
    # q, batch, heads, kv heads, head dim, k, v, cache length, positions, mask, mask stride,
    # scale, out, threads
    lib.lk_decode_attention.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64]
    lib.lk_decode_attention.argtypes += [ctypes.c_float, ptr, i32]
    lib.lk_decode_attention.restype = i32
    # q, batch, heads, kv heads, head dim, k, v, cos, sin, key cache, value cache, length, pos
    lib.lk_rope_cache.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64]
    lib.lk_rope_cache.restype = i32
    lib.lk_argmax_bf16.argtypes = [ptr, i64, i64, ptr]  # x, rows, n, out (int64)
    lib.lk_argmax_bf16.restype = i32
    # logits, rows, n, labels (int64), loss per row (float32), gradient (bf16) or None, threads
    lib.lk_cross_entropy_bf16.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32]
    lib.lk_cross_entropy_bf16.restype = i32
    return lib


def bf16_products() -> bool:
    """Whether the kernel multiplies bf16 activations in bf16 here (AVX512-BF16)."""
    lib = library()
    return lib is not None and lib.lk_nf4_bf16() == 1


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
    of times a second, so per call only the activations' pointers are new. The block scales
    are kept in float32 (double quantization undone once): 1/16 of a bit per weight more."""

    def __init__(self, state: NF4State) -> None:
        lib = library()
        assert lib is not None and supports(state, state.packed.device)
        self.call, self.shape = lib.lk_nf4_matmul, state.shape
        # Held here for as long as the pointers in the structure are used.
        self.tensors = [state.packed.contiguous(), block_absmax(state).float().contiguous()]
        packed, scales = (t.data_ptr() for t in self.tensors)
        self.weight = _Weight(packed, _CODE.data_ptr(), scales, *state.shape, state.blocksize)
        self.ref = ctypes.byref(self.weight)

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied layer has other buffers: it prepares its own call when used

    def __call__(self, x: Tensor, dtype: torch.dtype, lora: LoRA | None = None) -> Tensor:
        """x (..., in) @ W.T -> (..., out) in `dtype`, accumulated in float32; plus
        scale * (x @ A.T) @ B.T for `lora` = (A, B.T, scale), float32 contiguous A and B.T."""
        n_out, n_in = self.shape
        rows = _activations(x, n_in)
        y = torch.empty(*x.shape[:-1], n_out, dtype=_out_dtype(dtype))
        a = b = None
        rank, scale = 0, 0.0
        if lora is not None:
            a, b, scale = lora
            assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
            assert a.shape[1] == n_in and b.shape == (a.shape[0], n_out)
            a, b, rank = a.data_ptr(), b.data_ptr(), a.shape[0]
        status = self.call(
            self.ref,
            rows.data_ptr(),
            rows.dtype == torch.bfloat16,
            rows.shape[0],
            y.data_ptr(),
            y.dtype == torch.bfloat16,
            torch.get_num_threads(),
            a,
            b,
            rank,
            scale,
            x.dtype == dtype == torch.bfloat16,  # nothing of x lost in bf16 products
        )
        if status != 0:
            raise RuntimeError(f"the NF4 kernel refused a {tuple(self.shape)} weight")
        return y if y.dtype == dtype else y.to(dtype)

    def dequantize(self, dtype: torch.dtype) -> Tensor | None:
        """The (out, in) weight in `dtype` (float32 or bf16; None for others): the values of
        nf4.dequantize_nf4, an order of magnitude faster than its PyTorch gathers."""
        if dtype not in (torch.float32, torch.bfloat16):
            return None
        out = torch.empty(self.shape, dtype=dtype)
        lib = library()
        assert lib is not None
        status = lib.lk_nf4_dequantize(
            self.ref, out.data_ptr(), dtype == torch.bfloat16, torch.get_num_threads()
        )
        return out if status == 0 else None


class KernelGroup:
    """Several weights over the same activations in one call, each with its own adapter (or
    None): q, k and v, or gate and up. Per call the C side does what KernelWeight's calls
    would; what it saves is their Python and ctypes cost, most of a small matmul's time."""

    def __init__(self, parts: list[tuple[KernelWeight, LoRA | None]]) -> None:
        lib = library()
        assert lib is not None and len({k.shape[1] for k, _ in parts}) == 1
        for _, lora in parts:
            assert lora is None or all(
                t.dtype == torch.float32 and t.is_contiguous() for t in lora[:2]
            )
        self.parts, self.call, n = parts, lib.lk_nf4_matmul_n, len(parts)
        self.n_in = parts[0][0].shape[1]
        self.weights = (ctypes.c_void_p * n)(*[ctypes.addressof(k.weight) for k, _ in parts])
        self.a = (ctypes.c_void_p * n)(*[lo[0].data_ptr() if lo else None for _, lo in parts])
        self.b = (ctypes.c_void_p * n)(*[lo[1].data_ptr() if lo else None for _, lo in parts])
        self.ranks = (ctypes.c_int64 * n)(*[lo[0].shape[0] if lo else 0 for _, lo in parts])
        self.scales = (ctypes.c_float * n)(*[lo[2] if lo else 0.0 for _, lo in parts])
        self.outs = (ctypes.c_void_p * n)()

    def __call__(self, x: Tensor, dtype: torch.dtype) -> list[Tensor]:
        """x (..., in) -> each weight's (..., out) in `dtype`, as KernelWeight(x, dtype, lora)."""
        rows = _activations(x, self.n_in)
        out_dtype = _out_dtype(dtype)
        ys = [torch.empty(*x.shape[:-1], k.shape[0], dtype=out_dtype) for k, _ in self.parts]
        for i, y in enumerate(ys):
            self.outs[i] = y.data_ptr()
        status = self.call(
            len(ys),
            self.weights,
            rows.data_ptr(),
            rows.dtype == torch.bfloat16,
            rows.shape[0],
            self.outs,
            out_dtype == torch.bfloat16,
            torch.get_num_threads(),
            self.a,
            self.b,
            self.ranks,
            self.scales,
            x.dtype == dtype == torch.bfloat16,
        )
        if status != 0:
            raise RuntimeError("the NF4 kernel refused a group of weights")
        return ys if out_dtype == dtype else [y.to(dtype) for y in ys]


def _activations(x: Tensor, n_in: int) -> Tensor:
    """x as contiguous (rows, in) float32 or bf16, the two dtypes the kernel reads."""
    rows = x.reshape(-1, n_in)
    if rows.dtype not in (torch.float32, torch.bfloat16):
        rows = rows.float()
    return rows.contiguous()


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def nf4_matmul(x: Tensor, state: NF4State, dtype: torch.dtype, lora: LoRA | None = None) -> Tensor:
    """x (..., in) @ W.T (+ the adapter) in `dtype`, accumulated in float32. Check `supports`."""
    return KernelWeight(state)(x, dtype, lora)


def head_supports(weight: Tensor, x: Tensor) -> bool:
    """Whether `bf16_matmul` takes this weight and input: a 2-D bf16 CPU weight whose rows are
    a multiple of 32 elements, x on the CPU."""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == x.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[1] % 32 == 0
        and weight.is_contiguous()
        and library() is not None
    )


def bf16_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in) @ W.T in bf16 for a bf16 W, float32 sums. Check `head_supports`."""
    n_out, n_in = weight.shape
    rows = _activations(x, n_in)
    y = torch.empty(*x.shape[:-1], n_out, dtype=torch.bfloat16)
    lib = library()
    assert lib is not None
    status = lib.lk_bf16_matmul(
        weight.data_ptr(),
        n_out,
        n_in,
        rows.data_ptr(),
        rows.dtype == torch.bfloat16,
        rows.shape[0],
        y.data_ptr(),
        True,
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"the bf16 kernel refused a {tuple(weight.shape)} weight")
    return y


def _bf16_cpu(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """LlamaRMSNorm of bf16 x with a bf16 weight in one call (float32 inside, rounded back to
    bf16, times the weight), or None where it does not apply (other dtypes, no library)."""
    lib = library()
    if lib is None or not _bf16_cpu(x, weight) or weight.shape != x.shape[-1:]:
        return None
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    lib.lk_rms_norm(x.data_ptr(), x.numel() // n, n, weight.data_ptr(), eps, out.data_ptr())
    return out


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """The gradient of `rms_norm(x, weight, eps)` with respect to x for the output's gradient
    dy (the weight frozen), in one call; None where it does not apply."""
    lib = library()
    if lib is None or not _bf16_cpu(dy, x, weight) or dy.shape != x.shape:
        return None
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    dx = torch.empty_like(x)
    n = x.shape[-1]
    lib.lk_rms_norm_backward(
        dy.data_ptr(), x.data_ptr(), x.numel() // n, n, weight.data_ptr(), eps, dx.data_ptr()
    )
    return dx


def causal_softmax(scores: Tensor, window: int | None) -> Tensor | None:
    """Softmax in place over the last dim of bf16 scores (..., G * n, n), row r being query
    position r % n: later keys (and keys `window` or more positions back) get 0 and are not
    computed. Returns scores, or None where it does not apply (other dtypes, no library)."""
    lib = library()
    if lib is None or not _bf16_cpu(scores) or not scores.is_contiguous():
        return None
    n = scores.shape[-1]
    status = lib.lk_causal_softmax_bf16(scores.data_ptr(), scores.numel() // n, n, window or 0)
    return scores if status == 0 else None


def rope_applies(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `rope` takes these: bf16 on CPU, x (batch, heads, t, d), cos and sin (batch or
    1, t, d)."""
    if not _bf16_cpu(x, cos, sin) or x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    b, _, t, d = x.shape
    return cos.shape[1:] == (t, d) and cos.shape[0] in (1, b)


def rope(x: Tensor, cos: Tensor, sin: Tensor, backward: bool = False) -> Tensor | None:
    """The rotary embedding of bf16 x (batch, heads, t, d), laid out (batch, t, heads, d) as a
    projection's output viewed per head: x * cos + rotate_half(x) * sin for cos, sin (batch or
    1, t, d), rounded as PyTorch's bf16 operations are; with `backward`, x being the output's
    gradient, the gradient of the input. The result has x's layout; None where it does not
    apply (other dtypes or layouts, no library)."""
    lib = library()
    if lib is None or not rope_applies(x, cos, sin):
        return None
    b, h, t, d = x.shape
    rows = x.transpose(1, 2).contiguous()  # a projection's output: already so, no copy
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(rows)
    status = lib.lk_rope_bf16(
        rows.data_ptr(), b, t, h, d, cos.data_ptr(), sin.data_ptr(), cos.shape[0] // b,
        out.data_ptr(), int(backward),
    )  # fmt: skip
    return out.transpose(1, 2) if status == 0 else None


def swiglu(g: Tensor, u: Tensor) -> Tensor | None:
    """silu(g) * u of two bf16 tensors of one shape in one call, rounded as PyTorch's bf16
    silu then multiply are; None where it does not apply (other dtypes, no library)."""
    lib = library()
    if lib is None or not _bf16_cpu(g, u) or g.shape != u.shape:
        return None
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    lib.lk_swiglu(g.data_ptr(), u.data_ptr(), g.numel(), h.data_ptr())
    return h


def swiglu_backward(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor] | None:
    """The gradients of `swiglu(g, u)` with respect to g and u for the output's gradient dh,
    in one call; None where it does not apply."""
    lib = library()
    if lib is None or not _bf16_cpu(dh, g, u) or not dh.shape == g.shape == u.shape:
        return None
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    lib.lk_swiglu_backward(
        dh.data_ptr(), g.data_ptr(), u.data_ptr(), g.numel(), dg.data_ptr(), du.data_ptr()
    )
    return dg, du


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, t: int, mask: Tensor | None, scale: float
) -> Tensor | None:
    """One new position per row: q (B, H, 1, D) over the first t positions of the bf16 caches
    keys, values (B, Hkv, L, D), `mask` (B, >= t) bool or None -> (B, 1, H, D) in bf16; None
    where it does not apply (other dtypes or layouts, a head size not a multiple of 32)."""
    lib = library()
    b, heads, one, d = q.shape
    if (
        lib is None
        or one != 1
        or not _bf16_cpu(q, keys, values)
        or d % 32
        or not (keys.is_contiguous() and values.is_contiguous())
        or (mask is not None and (mask.dtype != torch.bool or mask.stride(-1) != 1))
    ):
        return None
    q = q.contiguous()
    out = torch.empty(b, 1, heads, d, dtype=torch.bfloat16)
    status = lib.lk_decode_attention(
        q.data_ptr(),
        b,
        heads,
        keys.shape[1],
        d,
        keys.data_ptr(),
        values.data_ptr(),
        keys.shape[2],
        t,
        None if mask is None else mask.data_ptr(),
        0 if mask is None else mask.stride(0),
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out if status == 0 else None


def rope_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    keys: Tensor,
    values: Tensor,
    pos: int,
) -> bool:
    """One new position per row: rotate q (B, 1, H, D) in place and write the rotated k and v
    (B, 1, Hkv, D) at `pos` of the caches (B, Hkv, L, D); cos, sin (B, 1, D) with sin's first
    half negated. The values of transformers' bf16 rotary arithmetic, bit for bit. False (and
    nothing done) where it does not apply: other dtypes or layouts, no library."""
    lib = library()
    b, one, heads, d = q.shape
    if (
        lib is None
        or one != 1
        or not _bf16_cpu(q, k, v, cos, sin, keys, values)
        or not all(t.is_contiguous() for t in (q, k, v, cos, sin, keys, values))
        or cos.numel() != b * d
        or sin.numel() != b * d
    ):
        return False
    status = lib.lk_rope_cache(
        q.data_ptr(),
        b,
        heads,
        keys.shape[1],
        d,
        k.data_ptr(),
        v.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        keys.shape[2],
        pos,
    )
    return status == 0


def argmax(logits: Tensor) -> Tensor | None:
    """(B, V) bf16 logits -> (B,) index of each row's largest value (the first of equals), or
    None where it does not apply (other dtypes, no library)."""
    lib = library()
    if lib is None or not _bf16_cpu(logits) or logits.dim() != 2 or logits.shape[1] == 0:
        return None
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    lib.lk_argmax_bf16(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr())
    return out


def cross_entropy(
    logits: Tensor, labels: Tensor, with_grad: bool, in_place: bool = False
) -> tuple[Tensor, Tensor | None] | None:
    """(n, V) bf16 logits, (n,) labels -> (each row's cross-entropy in float32, and where
    `with_grad` softmax - onehot in bf16: the summed loss's gradient with respect to the
    logits), the float32 arithmetic of PyTorch's path over a float32 copy. `in_place` writes
    that gradient over the (contiguous) logits. None where it does not apply (other dtypes, no
    library, a label out of range: PyTorch's path reports it), the logits then untouched."""
    lib = library()
    if (
        lib is None
        or not _bf16_cpu(logits)
        or logits.dim() != 2
        or labels.shape != logits.shape[:1]
    ):
        return None
    if in_place and not logits.is_contiguous():
        return None
    logits, labels = logits.contiguous(), labels.to(torch.int64).contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    grad = (logits if in_place else torch.empty_like(logits)) if with_grad else None
    status = lib.lk_cross_entropy_bf16(
        logits.data_ptr(),
        logits.shape[0],
        logits.shape[1],
        labels.data_ptr(),
        loss.data_ptr(),
        grad.data_ptr() if grad is not None else None,
        torch.get_num_threads(),
    )
    return (loss, grad) if status == 0 else None
