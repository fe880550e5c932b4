"""LoRA on a mixture-of-experts layer's fused expert weights, in PEFT's layout.

transformers 5 keeps a layer's experts in (experts, out, in) parameters (Mixtral's
`experts.gate_up_proj`, `experts.down_proj`), and its eager forward takes one expert's slice at
a time, `F.linear(x, self.gate_up_proj[i])`. `LoRAExperts` takes such a weight's place (the
parameter, or `NF4Experts` when the base is 4-bit) and adds named adapters of rank r for each
expert: indexing it gives expert i's weight plus scaling * B_i @ A_i, so the model's own forward
trains them. Like PEFT's `ParamWrapper` it has no dropout (the input never reaches it).

A batch whose rows run different adapters (`lora.layer.row_adapters`) reaches the experts as
one flat list of tokens; the experts module's forward then runs once per adapter over that
adapter's rows' tokens (`_forward_by_rows`), so every row gets its own adapter.

The factors are stored exactly as PEFT's `ParamWrapper` stores them, so that saved tensors need
no conversion: A is (r * experts, in), expert i's rows at [i*r, (i+1)*r); B is
(out, r * experts), expert i's columns at i, i + experts, i + 2 * experts, ... PEFT names an
adapter after the experts module and nests one wrapper per targeted weight in the class's order
of its weights: the last targeted weight's factors are `experts.lora_A`, the one before it
`experts.base_layer.lora_A`, and so on (`peft_names`, `internal_names`).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.lora.layer import LoRALinear
from lorakit.lora.targets import matches
from lorakit.quant.experts import NF4Experts, expert_weights, is_experts, replace_weight


class ExpertsWeight(nn.Module):
    """A full-precision fused expert weight held as a module (a LoRAExperts' base layer)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def __getitem__(self, i: int) -> Tensor:
        return self.weight[i]

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


class LoRAExperts(LoRALinear):
    """A fused expert weight plus named adapters, rank r per expert (see the module docstring)."""

    def __init__(self, base: nn.Module, transposed: bool = False) -> None:
        experts, rows, cols = base.shape
        # stored (experts, out, in), or (experts, in, out) where the class says is_transposed
        super().__init__(base, features=(rows, cols) if transposed else (cols, rows))
        self.num_experts = experts
        self.transposed = transposed
        self.group: str | None = None  # the adapter of the rows running now (mixed batches)

    @property
    def shape(self) -> torch.Size:
        return self.base_layer.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.base_layer.dtype

    def __len__(self) -> int:
        return self.num_experts

    def add_adapter(
        self, name: str, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        if dropout:
            raise LorakitError(
                f"LoRA dropout {dropout} cannot apply to mixture-of-experts weights (PEFT's "
                "adapters on them have none); train with --dropout 0"
            )
        super().add_adapter(name, rank, alpha, 0.0, use_rslora)

    def expert_delta(self, name: str, i: int) -> Tensor:
        """scaling * B_i @ A_i for expert i, (out, in), in the factors' dtype."""
        r, experts = self.rank(name), self.num_experts
        a = self.lora_A[name].weight[i * r : (i + 1) * r]
        b = self.lora_B[name].weight[:, i::experts]
        return (b @ a) * self.scaling[name]

    def _running(self) -> list[str]:
        if self.row_adapters is None:
            return [n for n in self.active_adapters if n not in self.merged_adapters]
        return [self.group] if self.group in self.lora_A else []

    def __getitem__(self, i: int | Tensor) -> Tensor:
        i = int(i)
        weight = self.base_layer[i]
        for name in self._running():
            delta = self.expert_delta(name, i)
            weight = weight + (delta.T if self.transposed else delta).to(weight.dtype)
        return weight

    def delta_weight(self, name: str) -> Tensor:
        """The update to every expert in the stored orientation, fp32."""
        deltas = torch.stack([self.expert_delta(name, i).float() for i in range(len(self))])
        return deltas.transpose(1, 2) if self.transposed else deltas

    def unwrapped(self) -> nn.Module | nn.Parameter:
        base = self.base_layer
        return base.weight if isinstance(base, ExpertsWeight) else base

    def decode_call(self) -> None:
        return None  # the experts' own forward runs; no fused kernel

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError("LoRAExperts is indexed by expert (experts[i]), not called")


def wrap_expert_weight(owner: nn.Module, attr: str) -> LoRAExperts | None:
    """`owner.attr` wrapped in a LoRAExperts (in its place), if it is a fused expert weight."""
    if not is_experts(owner) or attr not in expert_weights(owner):
        return None
    weight = getattr(owner, attr)
    base = weight if isinstance(weight, NF4Experts) else ExpertsWeight(weight)
    layer = LoRAExperts(base, transposed=getattr(owner, "is_transposed", False))
    replace_weight(owner, attr, layer)
    if "forward" not in owner.__dict__:
        owner.forward = types.MethodType(_forward_by_rows, owner)
    config = getattr(owner, "config", None)
    if config is not None and hasattr(config, "_experts_implementation"):
        # the eager forward indexes one expert at a time; the grouped ones read the raw tensor
        config._experts_implementation = "eager"
    return layer


def _forward_by_rows(
    owner: nn.Module, hidden_states: Tensor, *args: object, **kwargs: object
) -> Tensor:
    """The experts' own forward; when batch rows run different adapters, once per adapter over
    that adapter's rows' tokens (with the per-token routing that comes with them). Bound to the
    experts module (`types.MethodType`), so that a deep copy of the model stays right."""
    forward = type(owner).forward
    layers = [m for m in owner.children() if isinstance(m, LoRAExperts)]
    rows = layers[0].row_adapters if layers else None
    if rows is None:
        return forward(owner, hidden_states, *args, **kwargs)
    n = hidden_states.shape[0]
    if n % len(rows):
        raise LorakitError(f"{n} tokens do not split into the batch's {len(rows)} rows")
    per = n // len(rows)
    out = None
    for name in dict.fromkeys(rows):
        picked = [i * per + t for i, r in enumerate(rows) if r == name for t in range(per)]
        idx = torch.tensor(picked, device=hidden_states.device)
        for layer in layers:
            layer.group = name
        try:
            y = forward(
                owner,
                _take(hidden_states, idx, n),
                *(_take(a, idx, n) for a in args),
                **{k: _take(v, idx, n) for k, v in kwargs.items()},
            )
        finally:
            for layer in layers:
                layer.group = None
        out = y.new_empty((n, *y.shape[1:])) if out is None else out
        out[idx] = y
    assert out is not None
    return out


def _take(a: object, idx: Tensor, n: int) -> object:
    """The picked tokens' part of a per-token argument; anything else as it is."""
    is_tokens = isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n
    return a[idx] if is_tokens else a  # type: ignore[index]


def _nesting(model: nn.Module, chosen: Callable[[str, object], bool]) -> Iterator[tuple[str, str]]:
    """(PEFT's module name, our name) of each expert weight `chosen(our name, weight)` picks:
    on each experts module, the last picked weight is the module itself, the one before it
    `.base_layer`, and so on."""
    for owner_name, owner in model.named_modules():
        if is_experts(owner):
            picked = [
                w for w in expert_weights(owner) if chosen(f"{owner_name}.{w}", getattr(owner, w))
            ]
            for depth, w in enumerate(reversed(picked)):
                yield owner_name + ".base_layer" * depth, f"{owner_name}.{w}"


def peft_names(model: nn.Module, name: str) -> dict[str, str]:
    """Our name of each expert weight carrying adapter `name` -> the module name PEFT gives
    its factors (`...experts`, `...experts.base_layer`, ...)."""

    def carrying(_: str, weight: object) -> bool:
        return isinstance(weight, LoRAExperts) and name in weight.lora_A

    return {ours: theirs for theirs, ours in _nesting(model, carrying)}


def internal_names(model: nn.Module, target_parameters: Sequence[str]) -> dict[str, str]:
    """PEFT's module name for each expert weight `target_parameters` selects -> our name."""
    return dict(_nesting(model, lambda n, _: any(matches(n, t) for t in target_parameters)))


def target_parameter(module_name: str) -> str:
    """The name PEFT's `target_parameters` records for an expert weight: `experts.down_proj`."""
    return ".".join(module_name.split(".")[-2:])
