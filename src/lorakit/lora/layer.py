"""LoRA: trainable low-rank adapters over a frozen base layer (Hu et al., 2021).

`LoRALinear` wraps a frozen `nn.Linear`, a GPT-2 `Conv1D` or an `NF4Linear` (QLoRA is just
"the frozen weight is NF4") and adds any number of named adapters:

    y = base(x) + sum over active adapters a of  scaling_a * B_a(A_a(dropout(x)))

with A of shape (rank, in) and B of shape (out, rank), as in PEFT, whose module names
(`base_layer`, `lora_A`, `lora_B`) we keep so saved keys need no conversion table. Merging is a
plain function over weights. A batch may carry a different adapter per row (`row_adapters`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.kernels.nf4_matmul import KernelWeight
from lorakit.lora.rows import forget, kernel_lora, row_delta
from lorakit.quant.linear import KERNEL_ROWS, KernelCall, NF4Linear


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    return int(module.in_features), int(module.out_features)


def is_linear_like(module: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear, GPT-2 Conv1D or our NF4Linear."""
    return (
        isinstance(module, nn.Linear) or is_conv1d(module) or type(module).__name__ == "NF4Linear"
    )


def check_adapter_name(name: object) -> None:
    """Refuse an adapter name torch's ModuleDict (and so PEFT) cannot hold as a key."""
    if not isinstance(name, str) or not name or "." in name:
        raise LorakitError(
            f"adapter name {name!r} is not allowed: give a non-empty name without '.'"
        )


class LoRALinear(nn.Module):
    """A frozen base layer plus named LoRA adapters (see the module docstring)."""

    num_experts = 1  # weights the factors cover, rank rows of A (columns of B) each

    def __init__(self, base_layer: nn.Module, features: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features or layer_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # One adapter name (or None for the bare base) per batch row; None = use active_adapters.
        self.row_adapters: Sequence[str | None] | None = None
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.train(base_layer.training)  # wrapping a layer of a model in eval mode keeps it so

    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        if rank <= 0:
            raise LorakitError(f"LoRA rank must be a positive integer, got {rank}; try --rank 16")
        check_adapter_name(name)
        forget(self)  # what lora.rows keeps for mixed batches
        if name in self.lora_A:
            raise LorakitError(
                f"adapter {name!r} already exists on this layer; choose another name"
            )
        like = next(self.base_layer.buffers(), None)
        like = next(self.base_layer.parameters(), like)
        device = like.device if like is not None else None
        rows = rank * self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, rows, bias=False, device=device)
        self.lora_B[name] = nn.Linear(rows, self.out_features, bias=False, device=device)
        # PEFT's default init: A ~ kaiming-uniform, B = 0, so a new adapter changes nothing.
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(self.training)  # the new modules take the layer's mode: no dropout in eval
        # rsLoRA (Kalajdzievski, 2023) divides by sqrt(rank) so larger ranks keep learning.
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.active_adapters.append(name)

    def rank(self, name: str) -> int:
        return self.lora_A[name].out_features // self.num_experts

    def unwrapped(self) -> nn.Module:
        """What the model held before this wrapper took its place."""
        return self.base_layer

    def delete_adapter(self, name: str) -> None:
        forget(self)  # what lora.rows keeps for mixed batches
        if name in self.merged_adapters:
            self.unmerge(name)
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        del self.scaling[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.weight.dtype)
        return self.lora_B[name](a(self.lora_dropout[name](x))) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (out := self._decode_fused(x)) is not None:
            return out
        out = self.base_layer(x)
        if self.row_adapters is not None:
            return self._forward_rows(x, out)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                out = out + self._delta(x, name).to(out.dtype)
        return out

    def _decode_fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """A decoding step over an NF4 base with one adapter running: the compiled kernel adds
        the adapter in its own call (the separate small matmuls cost more than the layer)."""
        prompt = x.numel() > KERNEL_ROWS * x.shape[-1]
        if torch.is_grad_enabled() or prompt or not self.active_adapters:
            return None  # training or a prompt; no adapter: the base layer decodes by itself
        call = self.decode_call()
        return None if call is None else call(x)

    def decode_call(self) -> KernelCall | None:
        """The compiled kernel's call for this layer's decoding steps (NF4Linear.decode_call):
        an NF4 base with at most one unmerged float32 adapter, all rows on it; else None."""
        base = self.base_layer
        if not isinstance(base, NF4Linear):
            return None
        if self.row_adapters is not None:  # rows on different adapters (lora.rows)
            if self.merged_adapters or self.num_experts != 1:
                return None
            lora = kernel_lora(self, self.row_adapters)
            if lora is None:  # no row has an adapter here
                return base.decode_call()
            call = base.decode_call(lora)  # the CPU kernel: each row's adapter in its call
            if call is None or isinstance(call.kernel, KernelWeight):
                return call
            return dataclasses.replace(base.decode_call(), extra=self._wide_row_term)
        unmerged = [n for n in self.active_adapters if n not in self.merged_adapters]
        if len(unmerged) > 1:
            return None
        if not unmerged:
            return base.decode_call()
        a, b = self.lora_A[unmerged[0]].weight, self.lora_B[unmerged[0]].weight
        if a.dtype != torch.float32 or b.dtype != torch.float32:
            return None
        return base.decode_call((a.contiguous(), b.t().contiguous(), self.scaling[unmerged[0]]))

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each batch row gets its own adapter (or none): lora.rows."""
        if self.merged_adapters:
            raise LorakitError("unmerge adapters before running a batch with per-row adapters")
        return out + self._row_term(x).to(out.dtype)

    def _wide_row_term(self, x: torch.Tensor) -> torch.Tensor:
        """The rows' terms in float32, as the kernel computes one adapter's (decode_call)."""
        with torch.autocast(x.device.type, enabled=False):
            return self._row_term(x.float())

    def _row_term(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.row_adapters
        assert rows is not None
        if x.dim() == 2 and len(rows) < x.shape[0] and x.shape[0] % len(rows) == 0:
            # the rows' tokens flattened, row by row (a mixture-of-experts block's shared expert)
            rows = [r for r in rows for _ in range(x.shape[0] // len(rows))]
        if len(rows) != x.shape[0]:
            raise LorakitError(
                f"row_adapters names {len(rows)} rows but the batch has {x.shape[0]}"
            )
        return row_delta(self, x, rows)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in the base's (out, in) orientation, fp32."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def _base_weight(self) -> torch.Tensor:
        if not hasattr(self.base_layer, "weight") or not isinstance(
            self.base_layer.weight, torch.Tensor
        ):
            raise LorakitError(
                "cannot merge into a 4-bit base; load the base in full precision "
                "(quant='none') and merge there"
            )
        return self.base_layer.weight

    def merge(self, name: str, safe: bool = True) -> None:
        """Fold adapter `name` into the full-precision base weight."""
        if name in self.merged_adapters:
            return
        weight = self._base_weight()
        delta = self.delta_weight(name)
        delta = delta.T if is_conv1d(self.base_layer) else delta
        merged = weight.data.float() + delta.to(weight.device)
        if safe and not torch.isfinite(merged).all():
            raise LorakitError(
                f"merging adapter {name!r} gives NaN/inf weights; the adapter is broken"
            )
        weight.data.copy_(merged.to(weight.dtype))
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            return
        weight = self._base_weight()
        delta = self.delta_weight(name)
        delta = delta.T if is_conv1d(self.base_layer) else delta
        weight.data.copy_((weight.data.float() - delta.to(weight.device)).to(weight.dtype))
        self.merged_adapters.remove(name)

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.lora_A}
        return f"adapters={ranks}, active={self.active_adapters}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(module name, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def attach_lora(
    model: nn.Module,
    module_names: Sequence[str],
    name: str = "default",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Wrap each named module (once) and add adapter `name` to it; returns the wrapped names."""
    if rank <= 0:
        raise LorakitError(f"LoRA rank must be a positive integer, got {rank}; try --rank 16")
    check_adapter_name(name)
    from lorakit.lora.experts import wrap_expert_weight  # it builds on this module

    for module_name in module_names:
        owner_name, _, attr = module_name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        module = getattr(owner, attr, None)
        if isinstance(module, LoRALinear):
            pass
        elif (layer := wrap_expert_weight(owner, attr)) is not None:
            module = layer
        elif isinstance(module, nn.Module) and is_linear_like(module):
            module = LoRALinear(module)
            _set_submodule(model, module_name, module)
        else:
            raise LorakitError(
                f"{module_name} is a {type(module).__name__}, not a linear layer; "
                "LoRA targets must be linear layers or mixture-of-experts weights"
            )
        module.add_adapter(name, rank, alpha, dropout, use_rslora)
    return list(module_names)


def mark_only_lora_trainable(model: nn.Module) -> list[str]:
    """Freeze everything but LoRA A/B; returns the trainable parameter names."""
    names = []
    for pname, p in model.named_parameters():
        trainable = ".lora_A." in pname or ".lora_B." in pname
        p.requires_grad_(trainable)
        if trainable:
            names.append(pname)
    return names


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter loaded on the model, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A))
    return list(names)


def set_active_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Choose which adapters run (an empty list runs the bare base); each must be loaded."""
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        loaded = ", ".join(adapter_names(model)) or "none"
        raise LorakitError(
            f"no adapter named {unknown[0]!r} is loaded (loaded: {loaded}); load it first "
            "(lorakit.load_adapter(model, DIR, name=...) or --adapter NAME=DIR)"
        )
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.lora_A]


@contextmanager
def active_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the block, exactly these adapters run; the ones active before come back after."""
    before = {name: list(layer.active_adapters) for name, layer in lora_layers(model)}
    set_active_adapters(model, names)
    try:
        yield
    finally:
        for name, layer in lora_layers(model):
            layer.active_adapters = before.get(name, layer.active_adapters)


@contextmanager
def folded_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block, each layer's active adapters are added into its base's dequantized
    weight cache (`qlinear.dequantized_weights`), so a decode step costs the bare base's.

    Only layers whose base holds such a cache change; the 4-bit weight itself never does, and
    the cache and the adapters are restored on leaving the block.
    """
    folded = []
    try:
        for _, layer in lora_layers(model):
            cached = layer.base_layer.__dict__.get("_cached_weight")
            names = [n for n in layer.active_adapters if n not in layer.merged_adapters]
            if cached is None or not names or layer.row_adapters is not None:
                continue
            delta = sum(layer.delta_weight(n) for n in names).to(cached.device)
            layer.base_layer.__dict__["_cached_weight"] = (cached.float() + delta).to(cached.dtype)
            layer.merged_adapters.extend(names)
            folded.append((layer, cached, names))
        yield
    finally:
        for layer, cached, names in folded:
            layer.base_layer.__dict__["_cached_weight"] = cached
            for n in names:
                layer.merged_adapters.remove(n)


@contextmanager
def row_adapters(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Within the block, batch row i uses adapter rows[i] (None: the bare base)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.row_adapters = list(rows)
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None


def merge_lora(model: nn.Module, name: str, unload: bool = False) -> None:
    """Fold adapter `name` into every base weight; with unload, drop the LoRA wrappers."""
    for module_name, layer in list(lora_layers(model)):
        if name in layer.lora_A:
            layer.merge(name)
        if unload:
            _set_submodule(model, module_name, layer.unwrapped())
