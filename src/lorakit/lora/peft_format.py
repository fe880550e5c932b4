"""Adapters on disk, in exactly PEFT's format.

A directory holds `adapter_config.json` (`peft_type: "LORA"`, `r`, `lora_alpha`,
`target_modules`, ...) and `adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A is (r, in), B is (out, r)).
Adapters on mixture-of-experts weights are PEFT's `target_parameters` (`lora.experts`).
What we save loads with `peft.PeftModel.from_pretrained`; what PEFT saves loads here. PEFT
features we do not implement are refused by name, never silently ignored.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.atomic import atomic_write, atomic_write_text, make_dir
from lorakit.errors import LorakitError
from lorakit.lora.experts import LoRAExperts, internal_names, peft_names, target_parameter
from lorakit.lora.layer import (
    LoRALinear,
    attach_lora,
    check_adapter_name,
    is_conv1d,
    is_linear_like,
    layer_features,
    lora_layers,
)
from lorakit.lora.targets import experts_weights, matches, pattern_value, read_patterns

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def is_loftq(d: dict) -> bool:
    """Whether an adapter_config.json dict is a LoftQ adapter's: PEFT's own (init_lora_weights
    "loftq") or lorakit's, which keeps init_lora_weights true (PEFT's "loftq" would run LoftQ
    again, changing the base, as it loads the adapter) and records LoftQ in `loftq_config`."""
    return d.get("init_lora_weights") == "loftq" or bool(d.get("loftq_config"))


@dataclass
class AdapterConfig:
    """The LoRA settings of one adapter: what PEFT's LoraConfig records."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: object = field(default_factory=list)  # list of names, or a regex string
    base_model: str | None = None
    fan_in_fan_out: bool = False  # True for GPT-2 Conv1D targets
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: list[str] = field(default_factory=list)  # fused expert weights
    init: str = "default"  # "loftq": trained from the NF4 base's error (belongs to that base)

    def to_peft(self) -> dict:
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "target_parameters": sorted(self.target_parameters) or None,
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "modules_to_save": None,
            "init_lora_weights": True,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "use_dora": False,
            "inference_mode": True,
            "revision": None,
            # LoftQ's settings in PEFT's terms (4-bit NF4, one SVD): the adapter belongs to
            # the NF4 base. PEFT ignores them when it loads the adapter, and warns that it does.
            "loftq_config": {"loftq_bits": 4, "loftq_iter": 1} if self.init == "loftq" else {},
        }

    @classmethod
    def from_peft(cls, d: dict, where: str) -> AdapterConfig:
        """Read a PEFT adapter_config.json dict, refusing features we do not implement."""
        if not isinstance(d, dict):
            raise LorakitError(f"{where} holds {type(d).__name__}, not an object of settings")
        if d.get("peft_type", "LORA") != "LORA":
            raise LorakitError(
                f"{where}: peft_type {d.get('peft_type')!r} is not supported (LORA only)"
            )
        unsupported = {
            "use_dora": "DoRA",
            "modules_to_save": "modules_to_save (fully trained extra modules)",
            "layer_replication": "layer_replication",
            "trainable_token_indices": "trainable_token_indices",
            "lora_bias": "lora_bias",
            "use_qalora": "QA-LoRA",
            "alora_invocation_tokens": "aLoRA",
            # LoRA variants whose forward differs from plain LoRA (VeLoRA and MiCA do not).
            "arrow_config": "Arrow routing",
            "use_bdlora": "BD-LoRA (block-diagonal factors)",
            "kasa_config": "KaSA",
            "monteclora_config": "MonteCLoRA",
        }
        for key, feature in unsupported.items():
            # PEFT turns a sub-config dict into a dataclass, which is on even when empty ({}).
            if isinstance(d.get(key), dict) or d.get(key):
                raise LorakitError(
                    f"{where}: the PEFT feature {feature} is not supported by lorakit"
                )
        parameters = d.get("target_parameters") or []
        if not isinstance(parameters, list) or not all(isinstance(t, str) for t in parameters):
            raise LorakitError(f"{where}: target_parameters must be a list of names")
        if d.get("bias", "none") != "none":
            raise LorakitError(f"{where}: trained biases (bias={d['bias']!r}) are not supported")
        return cls(
            rank=int(d.get("r", 8)),
            alpha=float(d.get("lora_alpha", 8)),
            dropout=float(d.get("lora_dropout", 0.0) or 0.0),
            use_rslora=bool(d.get("use_rslora", False)),
            target_modules=d.get("target_modules") or [],
            base_model=d.get("base_model_name_or_path"),
            fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
            rank_pattern=read_patterns(d.get("rank_pattern"), int),
            alpha_pattern=read_patterns(d.get("alpha_pattern"), float),
            target_parameters=parameters,
            init="loftq" if is_loftq(d) else "default",
        )

    def alpha_for(self, module_name: str) -> float:
        """PEFT's alpha_pattern: the first pattern that matches the end of the name wins."""
        alpha = pattern_value(self.alpha_pattern, module_name)
        return self.alpha if alpha is None else float(alpha)

    def rank_for(self, module_name: str) -> int:
        """PEFT's rank_pattern, matched as alpha_pattern is."""
        rank = pattern_value(self.rank_pattern, module_name)
        return self.rank if rank is None else int(rank)


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights under PEFT's key names."""
    out = {}
    experts = peft_names(model, name)
    for module_name, layer in lora_layers(model):
        if name in layer.lora_A:
            key = experts.get(module_name, module_name)
            out[f"{PREFIX}{key}.lora_A.weight"] = layer.lora_A[name].weight
            out[f"{PREFIX}{key}.lora_B.weight"] = layer.lora_B[name].weight
    return out


def save_adapter(
    model: nn.Module, path: str | os.PathLike, config: AdapterConfig, name: str = "default"
) -> Path:
    """Write adapter `name` in PEFT's format (each file atomically); returns the directory."""
    path = Path(path)
    # fp32 as PEFT's adapters usually are, whatever dtype the model was cast to (bf16 -> fp32
    # is exact).
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in lora_state_dict(model, name).items()
    }
    if not tensors:
        raise LorakitError(f"the model has no adapter named {name!r} to save")
    carrying = {n: layer for n, layer in lora_layers(model) if name in layer.lora_A}
    for module_name, layer in carrying.items():
        # A config that does not describe the weights would save an adapter nothing can load.
        if layer.rank(name) != config.rank_for(module_name):
            rank = layer.rank(name)
            raise LorakitError(
                f"adapter {name!r} has rank {rank} on {module_name}, but the config says "
                f"{config.rank_for(module_name)}; save it with AdapterConfig(rank={rank}, ...) "
                "(or a rank_pattern for that module)"
            )
    config.fan_in_fan_out = any(
        is_conv1d(layer.base_layer) or getattr(layer.base_layer, "fan_in_fan_out", False)
        for layer in carrying.values()
    )
    _split_experts(config, carrying)
    write_adapter(path, tensors, config)
    return path


def _split_experts(config: AdapterConfig, carrying: dict[str, LoRALinear]) -> None:
    """Expert weights go to `target_parameters`; `target_modules` keeps the names that select
    modules (PEFT refuses a name that selects none)."""
    experts = [n for n, layer in carrying.items() if isinstance(layer, LoRAExperts)]
    if not experts:
        return
    if config.dropout:
        raise LorakitError(
            "adapters on mixture-of-experts weights take no dropout (PEFT's rule); save with "
            "dropout 0"
        )
    config.target_parameters = sorted({target_parameter(n) for n in experts})
    if not isinstance(config.target_modules, str):
        linear = [n for n in carrying if n not in experts]
        config.target_modules = sorted(
            t for t in config.target_modules if any(matches(n, t) for n in linear)
        )


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and weights of an adapter directory, validated, without touching a model."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_dir():
        raise LorakitError(f"adapter directory {path} not found")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise LorakitError(
                f"{path} holds adapter_model.bin (pickle), which lorakit never loads; convert it: "
                "PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise LorakitError(f"{path} has no {WEIGHTS_NAME}; is it an adapter directory?")
    if not config_file.is_file():
        raise LorakitError(f"{path} has no {CONFIG_NAME}; is it an adapter directory?")
    try:
        config = AdapterConfig.from_peft(json.loads(config_file.read_text()), str(config_file))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise LorakitError(f"{config_file} is not a valid adapter config: {e}") from None
    try:
        # from bytes, not memory-mapped: a server reading adapters back over and over grew by
        # ~15 KB a read with `load_file` (bench/serve_soak.py); adapters are megabytes
        weights = dict(sorted(load(weights_file.read_bytes()).items()))  # in load_file's order
    except (SafetensorError, OSError, ValueError) as e:
        raise LorakitError(f"{weights_file} is corrupt or unreadable ({e}); re-save it") from None
    for key, tensor in weights.items():
        if not tensor.is_floating_point():
            raise LorakitError(
                f"{weights_file}: {key} holds {tensor.dtype}, not floating-point weights; "
                "the adapter is broken: retrain or re-save it"
            )
        if not torch.isfinite(tensor).all():
            raise LorakitError(
                f"{weights_file} holds NaN/inf in {key}; the adapter is broken: retrain or "
                "re-save it"
            )
    return config, weights


def group_weights(
    weights: dict[str, torch.Tensor],
    config: AdapterConfig,
    where: Path,
    renames: dict[str, str] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"A": (r, in), "B": (out, r)}}, each pair of the rank its config gives.
    `renames` maps PEFT's names of expert-weight factors to ours (their rank is checked against
    the model, `_check_target`)."""
    renames = renames or {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise LorakitError(f"{where}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        module_name = renames.get(match.group(1), match.group(1))
        modules.setdefault(module_name, {})[match.group(2)] = tensor
    if not modules:
        raise LorakitError(f"{where}: the adapter holds no LoRA weights")
    for module_name, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise LorakitError(f"{where}: {module_name} has lora_A or lora_B but not both")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LorakitError(
                f"{where}: {module_name} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, not (r, in) and (out, r); the adapter is broken: re-save it"
            )
        expected = config.rank_for(module_name)
        if a.shape[0] != expected and module_name not in renames.values():
            said = (
                "r" if pattern_value(config.rank_pattern, module_name) is None else "rank_pattern"
            )
            raise LorakitError(
                f"{where}: {module_name} has rank {a.shape[0]} in its tensors but {CONFIG_NAME} "
                f"says {said} = {expected}; the config does not belong to these weights: "
                "re-save the adapter"
            )
    return modules


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> AdapterConfig:
    """Attach the adapter at `path` to `model` as adapter `name` (any rank, any layer subset)."""
    check_adapter_name(name)
    config, weights = read_adapter(path)
    renames = internal_names(model, config.target_parameters)
    modules = group_weights(weights, config, Path(path), renames)
    # Check every module before wrapping any, so an error leaves the model untouched.
    experts = experts_weights(model)
    ranks = {
        m: _check_target(model, path, config, m, pair["A"], pair["B"], name, experts)
        for m, pair in modules.items()
    }
    for module_name, pair in modules.items():
        # PEFT's expert adapters have no dropout
        dropout = 0.0 if module_name in experts else config.dropout
        alpha = config.alpha_for(module_name)
        rank = ranks[module_name]
        attach_lora(model, [module_name], name, rank, alpha, dropout, config.use_rslora)
        layer = model.get_submodule(module_name)
        assert isinstance(layer, LoRALinear)
        layer.lora_A[name].weight.data.copy_(pair["A"])
        layer.lora_B[name].weight.data.copy_(pair["B"])
        layer.lora_A[name].requires_grad_(False)
        layer.lora_B[name].requires_grad_(False)
    return config


def _check_target(
    model: nn.Module,
    path: str | os.PathLike,
    config: AdapterConfig,
    module_name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    name: str,
    experts: dict[str, tuple[int, int, int]],
) -> int:
    """The rank of the adapter's factors for this module; refuses a module the model lacks,
    that has adapter `name`, or that A/B do not fit."""
    module = _find(model, module_name)
    if module is None:
        raise LorakitError(
            f"{path}: the adapter targets {module_name}, which this model lacks; it was made "
            f"for another architecture (base: {config.base_model})"
        )
    wrapped = isinstance(module, LoRALinear)
    if wrapped and name in module.lora_A:
        raise LorakitError(
            f"adapter {name!r} already exists on {module_name}; load it under another name"
        )
    if module_name in experts:
        count, out_f, in_f = experts[module_name]
    elif wrapped or (isinstance(module, nn.Module) and is_linear_like(module)):
        count, (in_f, out_f) = 1, layer_features(module)  # a LoRALinear: its base's features
    else:
        raise LorakitError(
            f"{path}: the adapter targets {module_name}, a {type(module).__name__}, which "
            "lorakit does not adapt (linear layers and mixture-of-experts weights only)"
        )
    rows = a.shape[0]
    if rows % count or a.shape != (rows, in_f) or b.shape != (out_f, rows):
        shapes = f"A {(rows, in_f)}, B {(out_f, rows)}" + (
            f" with rows a multiple of its {count} experts" if count > 1 else ""
        )
        raise LorakitError(
            f"{path}: {module_name} needs {shapes}; the adapter has {tuple(a.shape)} and "
            f"{tuple(b.shape)}: it was made for a model of another size"
        )
    return rows // count


def _find(model: nn.Module, name: str) -> object | None:
    """The module (or fused expert weight) of that name, or None."""
    owner_name, _, attr = name.rpartition(".")
    try:
        return getattr(model.get_submodule(owner_name), attr, None)
    except AttributeError:
        return None


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    from safetensors.torch import save_file

    # Serialize the config first: if that fails, neither file has been replaced yet.
    config_text = json.dumps(config.to_peft(), indent=2) + "\n"
    make_dir(path, "the adapter directory")
    atomic_write(
        path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    atomic_write_text(path / CONFIG_NAME, config_text)
