"""LoftQ initialisation (Li et al., 2023): start each adapter at what 4-bit quantization lost,
so that QLoRA starts from the 16-bit model instead of the rounded one.

With W a target layer's 16-bit weight and Q = dequant(NF4(W)) what the frozen base computes
with, R = W - Q is the base's error. Its rank-r truncated SVD U_r S_r V_r^T is the closest a
rank-r matrix comes to R (Eckart-Young), so B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T
(s the adapter's scaling) give base + adapter = Q + U_r S_r V_r^T, as close to W as a rank-r
adapter can bring it. The NF4 base is left as it is, so the adapter stays a plain PEFT LoRA
adapter of that base. (LoftQ's alternating steps re-quantize W - BA, which changes the base; with
the base fixed the one-shot SVD is already optimal, so there is nothing to iterate.)

The 16-bit weights are read again from the model's files, one tensor at a time, and only the
targets' are kept; a checkpoint stored in 4 bits has none and is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.layer import LoRALinear
from lorakit.models.loading import ModelSource, empty_model, load_config, read_tensors
from lorakit.quant.bnb_format import is_prequantized
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import NF4State

FULL_SVD_DIM = 1024  # exact SVD up to this smaller dimension; a randomized one above it


@dataclass
class LoftQReport:
    layers: int
    seconds: float
    error_before: float  # ||W - Q||_F / ||W||_F over the target layers
    error_after: float  # ||W - Q - scaling * B A||_F / ||W||_F


def low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r): the rank-`rank` truncated SVD of a 2-D float32 matrix; exact for
    small layers, `torch.svd_lowrank` (randomized, 4 power iterations) for large ones."""
    if min(residual.shape) <= FULL_SVD_DIM:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(residual, q=min(rank + 16, min(residual.shape)), niter=4)
    return u[:, :rank], s[:rank], v[:, :rank].T


def _layers(model: nn.Module, adapter: str) -> dict[str, LoRALinear]:
    """The wrapped layers carrying `adapter`, by the weight name of the unwrapped model."""
    layers = {}
    for name, module in model.named_modules():
        if type(module) is not LoRALinear or adapter not in module.lora_A:
            continue  # fused expert weights (LoRAExperts) keep the default init
        if not isinstance(module.base_layer, NF4Linear):
            raise LorakitError(
                f"--init loftq: {name} is not stored in 4 bits, so it has no quantization error "
                "to start from; load the base with --quant nf4"
            )
        layers[f"{name}.weight"] = module
    return layers


@torch.no_grad()
def loftq_init(model: nn.Module, source: ModelSource, adapter: str = "default") -> LoftQReport:
    """Set `adapter`'s A and B on every 4-bit target layer of `model` (loaded from `source`)
    from the SVD of that layer's quantization error (see the module docstring)."""
    config = load_config(source)
    if is_prequantized(config, source.path):
        raise LorakitError(
            f"--init loftq needs the 16-bit weights the 4-bit base is made from, and "
            f"{source.path} stores them in 4 bits only; train the original 16-bit model "
            "(lorakit quantizes it as it loads) or drop --init loftq"
        )
    layers = _layers(model, adapter)
    if not layers:
        raise LorakitError(f"--init loftq: adapter {adapter!r} is on no 4-bit linear layer")
    t0, done = time.perf_counter(), set()
    error_before = error_after = norm = 0.0
    for name, tensor in read_tensors(source, empty_model(config)):
        layer = layers.get(name)
        if layer is None or isinstance(tensor, NF4State):
            continue
        base = layer.base_layer
        weight = tensor.float().T if getattr(base, "fan_in_fan_out", False) else tensor.float()
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise LorakitError(
                f"--init loftq: {name} in {source.path} is {list(weight.shape)}, not the "
                f"model's {[layer.out_features, layer.in_features]}; point the run's model "
                "setting at the checkpoint the model was loaded from"
            )
        residual = weight.to(base.packed.device) - base.dequantized_weight(torch.float32)
        u, s, vh = low_rank(residual, layer.rank(adapter))
        root, k = (s / layer.scaling[adapter]).sqrt(), len(s)
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        # A rank above the layer's smaller dimension keeps PEFT's init (B = 0) past it.
        a[:k].copy_((root[:, None] * vh).to(a))
        b[:, :k].copy_((u * root).to(b))
        after = residual - layer.scaling[adapter] * (b.float() @ a.float())
        error_before += float(residual.square().sum())
        error_after += float(after.square().sum())
        norm += float(weight.square().sum())
        done.add(name)
        del tensor, weight, residual, after
    if len(done) != len(layers):
        missing = next(n for n in layers if n not in done)
        raise LorakitError(f"--init loftq: {source.path} has no 16-bit weight {missing}")
    norm = max(norm, 1e-30)
    return LoftQReport(
        layers=len(done),
        seconds=time.perf_counter() - t0,
        error_before=(error_before / norm) ** 0.5,
        error_after=(error_after / norm) ** 0.5,
    )
