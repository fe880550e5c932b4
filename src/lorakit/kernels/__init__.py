"""Kernels: compiled CPU kernels (one C file each, with its Python wrapper and, beside it, the
pure-PyTorch reference it is tested against), and the fused NF4 kernels for CUDA GPUs.

Every CPU wrapper returns None (or False) where its kernel does not apply: no C compiler, a CPU
without AVX2, another dtype or device, `LORAKIT_NF4_KERNEL=0`. Callers then run the PyTorch
path, so lorakit works everywhere and is fast where the kernels run. `_build` compiles the C
files into one library at first use and caches it.

The wrappers call C through ctypes, not as torch.library custom ops: measured on one row, a
custom op's dispatch cost more than the whole ctypes call of a small kernel (an RMSNorm), and a
decoding step makes hundreds of such calls.

On CUDA, `nf4_backend` picks who quantizes, dequantizes and multiplies NF4 weights: our Triton
kernels (`triton_nf4`, `triton_nf4_matmul`; tested on CPU under TRITON_INTERPRET=1),
bitsandbytes' (`bnb_nf4`) or the PyTorch reference, all bit-identical in what they store and
dequantize.
"""
