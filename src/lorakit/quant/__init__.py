"""Quantization: the NF4 format and its PyTorch reference (`nf4`), and the frozen 4-bit linear
layer built on it (`linear`).

The floors inside: `nf4` is the bottom of lorakit (it imports nothing of ours); the compiled
kernels (`lorakit.kernels`) build on it; `linear.NF4Linear` builds on both.
"""
