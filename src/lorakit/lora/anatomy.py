"""The model's anatomy, as `lorakit inspect` reports it: the module tree with repeated blocks
folded, the LoRA target candidates with what each would cost, the default targets and why, and
the base's memory in fp32, bf16 and NF4."""

from __future__ import annotations

from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.layer import is_linear_like, layer_features
from lorakit.lora.targets import (
    TESTED_ARCHITECTURES,
    candidate_dicts,
    default_target_names,
    experts_weights,
    linear_modules,
    lora_param_count,
    resolve_targets,
    role,
)
from lorakit.quant.experts import expert_weights, is_experts

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # codes + 8-bit absmax per 64 + fp32 scale per 256 blocks


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _describe(module: nn.Module) -> str:
    kind = type(module).__name__
    if is_linear_like(module):
        fin, fout = layer_features(module)
        bias = getattr(module, "bias", None) is not None
        return f"{kind}({fin}→{fout}{', bias' if bias else ''})"
    if isinstance(module, nn.Embedding):
        return f"{kind}({module.num_embeddings}, {module.embedding_dim})"
    if is_experts(module) and (weights := expert_weights(module)):
        n = next(iter(weights.values()))[0]
        parts = ", ".join(f"{w} {i}→{o}" for w, (_, o, i) in weights.items())
        return f"{kind}({n} experts x ({parts}))"
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and not list(module.children()):
        return f"{kind}({tuple(weight.shape)})"
    return kind


def module_tree(model: nn.Module) -> list[str]:
    """`print(model)`, condensed: identical repeated blocks fold into `(0-29): 30 x Block`."""
    lines: list[str] = []

    def visit(label: str, module: nn.Module, depth: int) -> None:
        count = _count(module)
        lines.append(
            f"{'  ' * depth}{label}: {_describe(module)}"
            + (f"  [{_human(count)}]" if count else "")
        )
        children = list(module.named_children())
        if isinstance(module, nn.ModuleList) and len(children) > 1:
            first = str(children[0][1])
            if all(str(c) == first for _, c in children[1:]):
                block = children[0][1]
                fold = f"(0-{len(children) - 1}): {len(children)} x {type(block).__name__}"
                lines.append(f"{'  ' * (depth + 1)}{fold}  [{_human(_count(block))} each]")
                for name, child in block.named_children():
                    visit(name, child, depth + 2)
                return
        for name, child in children:
            visit(name, child, depth + 1)

    visit(type(model).__name__, model, 0)
    lines[0] = lines[0].split(": ", 1)[1] if ": " in lines[0] else lines[0]
    return lines


def anatomy(model: nn.Module, rank: int = 16, spec: str | None = None) -> dict:
    """Everything `lorakit inspect` reports, as plain data (JSON-ready)."""
    if rank <= 0:
        raise LorakitError(f"rank must be a positive integer, got {rank}; try --rank 16")
    total = _count(model)
    quantized = sum(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in linear_modules(model).values()
    )
    experts = experts_weights(model)
    quantized += sum(e * o * i for e, o, i in experts.values())  # NF4 per expert
    selected, _ = resolve_targets(model, spec)
    lora = lora_param_count(model, selected, rank)
    default_names, reason = default_target_names(model)
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "parameters": total,
        "tree": module_tree(model),
        "candidates": candidate_dicts(model),
        "default_targets": default_names,
        "default_reason": reason,
        "tested": getattr(config, "model_type", None) in TESTED_ARCHITECTURES,
        "experts": sorted({role(n) for n in experts}),
        "adapter": {
            "rank": rank,
            "targets": spec or "default",
            "modules": len(selected),
            "parameters": lora,
            "share_of_model": lora / total,
            "size_mb": lora * 4 / 1e6,  # fp32 safetensors, as PEFT saves
        },
        "memory_mb": {
            "fp32": total * 4 / 1e6,
            "bf16": total * 2 / 1e6,
            "nf4": (quantized * NF4_BITS / 8 + (total - quantized) * 2) / 1e6,
        },
    }


def format_anatomy(report: dict, title: str) -> str:
    """The human-readable inspect report."""
    a, mem = report["adapter"], report["memory_mb"]
    out = [f"{title} ({report['model_type']}): {_human(report['parameters'])} parameters", ""]
    out += ["Module tree", *("  " + line for line in report["tree"]), ""]
    out.append(f"LoRA target candidates (adapter size at rank {a['rank']})")
    row = "  {:<28}{:>8}  {:>12}  {:>12}  {:>12}  {}".format
    out.append(row("target", "modules", "shape", "base params", "LoRA params", "default"))
    for c in report["candidates"]:
        shape = f"{c['in_features']}→{c['out_features']}"
        shape += f" x{c['experts']}" if c["experts"] > 1 else ""
        lora = a["rank"] * (c["in_features"] + c["out_features"]) * c["count"] * c["experts"]
        mark = "yes" if c["default"] else ""
        out.append(row(c["name"], c["count"], shape, _human(c["params"]), _human(lora), mark))
    out += [
        "",
        f"Default targets: {', '.join(report['default_targets'])} ({report['default_reason']}).",
        *(
            [
                f"Experts ({', '.join(report['experts'])}): stored in NF4 per expert; adapters "
                "reach them by name or all-linear (rank r for each expert, no dropout); "
                "routers stay frozen."
            ]
            if report["experts"]
            else []
        ),
        (
            f"Architecture {report['model_type']}: tested end to end (load, QLoRA training, "
            "the adapter in PEFT, generation)."
            if report["tested"]
            else f"Architecture {report['model_type']}: not in lorakit's tested set ("
            + ", ".join(TESTED_ARCHITECTURES)
            + "); it takes the same paths, untested."
        ),
        f"Adapter at --rank {a['rank']} --targets {a['targets']}: {a['modules']} modules, "
        f"{_human(a['parameters'])} trainable parameters ({a['share_of_model']:.2%} of the model), "
        f"{a['size_mb']:.1f} MB on disk.",
        f"Base model memory: fp32 {mem['fp32']:.0f} MB, bf16 {mem['bf16']:.0f} MB, "
        f"NF4 {mem['nf4']:.0f} MB (linear layers in NF4 with double quantization, the rest bf16).",
    ]
    return "\n".join(out)
