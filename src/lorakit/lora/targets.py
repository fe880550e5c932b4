"""Which modules to adapt.

A target spec is one of:
  - `default` (or nothing): the attention projections of the architecture (table below);
  - `all-linear`: every linear layer except the output head (as QLoRA does), and the fused
    expert weights of mixture-of-experts layers (rank r for each expert, `lora.experts`);
  - names, comma-separated: a module matches name `t` when its full name is `t` or ends in
    `.t` (PEFT's rule), so `q_proj` or `attn.c_proj` both work;
  - `re:REGEX`: module full names that match REGEX entirely (PEFT's rule for a string).

An expert weight is named like a module, `model.layers.0.mlp.experts.gate_up_proj`, so that
`gate_up_proj` or `experts.down_proj` select it. Routers (`mlp.gate`, a bare weight) stay frozen.

Unknown architectures fall back to a rule on module names: every linear layer inside a module
whose name contains `attn` or `attention`; if there is none, all-linear.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.layer import LoRALinear, is_linear_like, layer_features
from lorakit.quant.experts import expert_weights, is_experts

# Attention projections per `config.model_type` (names as in transformers' modeling files).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "stablelm",
            "starcoder2",
            "granite",
            "cohere",
            "deepseek_v2",
            "internlm2",
            "smollm3",
            "phimoe",
            "exaone",
            "helium",
        ],
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "gpt_bigcode": ["attn.c_attn", "attn.c_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "self_attn.dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense"],
    "falcon": ["self_attention.query_key_value", "self_attention.dense"],
    "bloom": ["self_attention.query_key_value", "self_attention.dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "codegen": ["qkv_proj", "out_proj"],
    "mpt": ["Wqkv", "out_proj"],
}


# Architectures (config.model_type) that tests/test_architectures.py takes end to end: a model
# saved by transformers -> inspect -> QLoRA training -> the adapter in PEFT with the same logits
# -> generation. Others get the same code paths, untested.
TESTED_ARCHITECTURES = (
    "bloom",
    "codegen",
    "cohere",
    "falcon",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "gpt_bigcode",
    "gpt_neox",
    "gptj",
    "granite",
    "llama",
    "mistral",
    "mixtral",
    "olmo2",
    "olmoe",
    "opt",
    "phi",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "stablelm",
    "starcoder2",
)


def matches(module_name: str, target: str) -> bool:
    """PEFT's rule: the name is the target, or ends in `.target`."""
    return module_name == target or module_name.endswith("." + target)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like module that may carry an adapter (the output head never does).

    A layer already wrapped by LoRA counts under its own name (not `.base_layer`).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        wrapped = isinstance(module, LoRALinear)
        inside = name.endswith(".base_layer") or ".lora_" in name
        if wrapped or (is_linear_like(module) and module is not head and not inside):
            found[name] = module
    return found


def experts_weights(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Full name (`...experts.gate_up_proj`) -> (experts, out, in) of every fused expert weight."""
    return {
        f"{name}.{w}": shape
        for name, module in model.named_modules()
        if is_experts(module)
        for w, shape in expert_weights(module).items()
    }


def _is_router(model: nn.Module, target: str) -> bool:
    return any(
        type(m).__name__.endswith("Router") and matches(n, target.removesuffix(".weight"))
        for n, m in model.named_modules()
    )


def role(module_name: str) -> str:
    """The module's place in the repeated block: layer indices replaced by `*`."""
    return ".".join("*" if part.isdigit() else part for part in module_name.split("."))


def short_names(names: Sequence[str]) -> dict[str, str]:
    """role -> the shortest name suffix that selects exactly the modules of that role."""
    out = {}
    for r in sorted({role(n) for n in names}):
        parts = [p for p in r.split(".") if p != "*"]
        out[r] = parts[-1]  # ambiguous leaf name if no suffix is unique (a rare layout)
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if {role(n) for n in names if matches(n, suffix)} == {r}:
                out[r] = suffix
                break
    return out


def default_target_names(model: nn.Module) -> tuple[list[str], str]:
    """The default target names for this model and the reason for them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type], f"attention projections of {model_type}"
    names = linear_modules(model)
    attn = [n for n in names if re.search(r"attn|attention", n, re.IGNORECASE)]
    if attn:
        table = short_names(attn)
        reason = f"unknown architecture {model_type!r}: linear layers inside attention modules"
        return sorted(set(table.values())), reason
    return [
        "all-linear"
    ], f"unknown architecture {model_type!r} with no attention module: all-linear"


def resolve_targets(model: nn.Module, spec: str | Sequence[str] | None) -> tuple[list[str], object]:
    """Full module names selected by `spec`, and the `target_modules` value PEFT should save."""
    candidates = [*linear_modules(model), *experts_weights(model)]
    if spec is None or spec == "default" or spec == ["default"]:
        spec, _ = default_target_names(model)
    if isinstance(spec, str):
        spec = (
            [s.strip() for s in spec.split(",") if s.strip()]
            if not spec.startswith("re:")
            else [spec]
        )
    if not spec:
        raise LorakitError("empty target spec; use default, all-linear, names or re:REGEX")
    if list(spec) == ["all-linear"]:
        selected = list(candidates)
        peft_targets: object = sorted(set(short_names(list(linear_modules(model))).values()))
    elif len(spec) == 1 and spec[0].startswith("re:"):
        pattern = spec[0][3:]
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise LorakitError(f"target regex {pattern!r} is invalid: {e}") from None
        selected = [n for n in candidates if regex.fullmatch(n)]
        peft_targets = pattern
        if not selected:
            raise LorakitError(
                f"target regex {pattern!r} matches no linear layer; candidates: "
                + ", ".join(sorted(set(short_names(list(candidates)).values())))
            )
    else:
        selected, peft_targets = [], sorted(set(spec))
        for target in spec:
            hits = [n for n in candidates if matches(n, target)]
            if not hits and _is_router(model, target):
                raise LorakitError(
                    f"target {target!r} is a mixture-of-experts router (a bare experts x hidden "
                    "weight): lorakit keeps routers frozen; target the attention projections "
                    "(default), the experts (gate_up_proj, down_proj) or other linear layers"
                )
            if not hits:
                raise LorakitError(
                    f"target {target!r} matches no linear layer; candidates: "
                    + ", ".join(sorted(set(short_names(list(candidates)).values())))
                    + " (or all-linear, or re:REGEX)"
                )
            selected += hits
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(set(selected), key=order.__getitem__), peft_targets


@dataclass(frozen=True)
class Candidate:
    """One kind of linear layer in the model, as a LoRA target."""

    name: str  # the short target name that selects exactly these modules
    role: str  # full module name with layer indices as `*`
    count: int
    in_features: int
    out_features: int
    params: int  # base parameters in all modules of this kind
    default: bool
    experts: int = 1  # a fused expert weight: this many (out, in) matrices per module


def candidates(model: nn.Module) -> list[Candidate]:
    modules, experts = linear_modules(model), experts_weights(model)
    table = short_names([*modules, *experts])  # each name selects one kind, experts included
    default_names, _ = default_target_names(model)
    default_selected = set(resolve_targets(model, default_names)[0])
    by_role: dict[str, list[str]] = {}
    for n in modules:
        by_role.setdefault(role(n), []).append(n)
    out = []
    for r, names in by_role.items():
        fin, fout = layer_features(modules[names[0]])
        out.append(
            Candidate(
                name=table[r],
                role=r,
                count=len(names),
                in_features=fin,
                out_features=fout,
                params=sum(fin * fout for _ in names),
                default=names[0] in default_selected,
            )
        )
    by_role = {}
    for n in experts:
        by_role.setdefault(role(n), []).append(n)
    for r, names in by_role.items():
        e, fout, fin = experts[names[0]]
        count = len(names)
        out.append(Candidate(table[r], r, count, fin, fout, e * fin * fout * count, False, e))
    return out


def lora_param_count(model: nn.Module, module_names: Sequence[str], rank: int) -> int:
    """Trainable parameters of a rank-`rank` adapter on these modules: rank * (in + out) each,
    for every expert of a fused expert weight."""
    experts = experts_weights(model)
    total = 0
    for n in module_names:
        if n in experts:
            e, fout, fin = experts[n]
            total += e * rank * (fin + fout)
        else:
            total += rank * sum(layer_features(model.get_submodule(n)))
    return total


def candidate_dicts(model: nn.Module) -> list[dict]:
    return [asdict(c) for c in candidates(model)]


def read_patterns(patterns: object, kind: type) -> dict:
    """A rank_pattern / alpha_pattern read from JSON: {regex: number}; ValueError if not."""
    if not patterns:
        return {}
    if not isinstance(patterns, dict):
        raise ValueError(f"a pattern table must be an object, got {type(patterns).__name__}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a regular expression ({e})") from None
    return {str(k): kind(v) for k, v in patterns.items()}


def pattern_value(patterns: dict, module_name: str) -> object | None:
    """The value of the first pattern that matches the end of `module_name` (a whole dotted
    part or more), as PEFT's get_pattern_key does; None if none does."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return None


def layer_stack(model: nn.Module) -> str | None:
    """The name of the model's stack of decoder layers (`model.layers`, `transformer.h`...),
    None if it has no list of that many modules."""
    n = model.config.get_text_config().num_hidden_layers
    names = [k for k, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    return min(names, key=len) if names else None


def lowest_adapted_layer(model: nn.Module, selected: list[str]) -> int:
    """The index of the lowest decoder layer holding one of the `selected` modules (0 if one is
    outside the stack): backward never reaches the layers below it, so they keep nothing."""
    stack = (layer_stack(model) or "\0") + "."
    inside = [n[len(stack) :].partition(".")[0] for n in selected if n.startswith(stack)]
    if len(inside) < len(selected) or not inside:
        return 0
    return min(int(i) for i in inside)
