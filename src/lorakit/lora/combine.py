"""Several adapters folded into one: `lorakit merge --adapters A B --weights ...` without a base
model. The result is exact for any ranks (the factors are concatenated, not averaged)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from lorakit.atomic import check_new_dir
from lorakit.errors import LorakitError
from lorakit.lora.peft_format import (
    PREFIX,
    AdapterConfig,
    group_weights,
    read_adapter,
    write_adapter,
)


def combine_adapters(
    paths: list[str | os.PathLike], weights: list[float], out: str | os.PathLike
) -> AdapterConfig:
    """One adapter whose update is sum_i w_i * (its update), exactly, for any ranks.

    delta_i = s_i B_i A_i, so sum_i w_i delta_i = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] @ [A_1; ...]:
    A and B are concatenated along the rank (modules an adapter lacks get zero blocks) and the
    new scaling is 1 (alpha = rank).
    """
    if len(paths) != len(weights):
        raise LorakitError(f"{len(weights)} weights for {len(paths)} adapters")
    check_new_dir(out, "--out")  # never over an adapter (one of these, perhaps) or a file
    loaded = []
    for path, (cfg, w) in zip(paths, map(read_adapter, paths), strict=True):
        if cfg.target_parameters:
            raise LorakitError(
                f"{path} has adapters on mixture-of-experts weights, which lorakit cannot "
                "combine yet; load the adapters side by side instead"
            )
        loaded.append((cfg, group_weights(w, cfg, Path(path))))
    modules = sorted({m for _, mods in loaded for m in mods})
    shapes: dict[str, tuple[int, int]] = {}
    for path, (_, mods) in zip(paths, loaded, strict=True):
        for m, pair in mods.items():
            shape = (pair["A"].shape[1], pair["B"].shape[0])
            if shapes.setdefault(m, shape) != shape:
                raise LorakitError(
                    f"{path}: {m} has shape {shape}, another adapter {shapes[m]}: "
                    "these adapters belong to different base models"
                )
    ranks = [max(pair["A"].shape[0] for pair in mods.values()) for _, mods in loaded]
    tensors = {}
    for m in modules:
        fin, fout = shapes[m]
        a_blocks, b_blocks = [], []
        for (cfg, mods), w, r in zip(loaded, weights, ranks, strict=True):
            pair = mods.get(m)
            if pair is None:
                a_blocks.append(torch.zeros(r, fin))
                b_blocks.append(torch.zeros(fout, r))
                continue
            rank = pair["A"].shape[0]
            alpha = cfg.alpha_for(m)
            scaling = alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank
            pad = r - rank  # a module with a smaller rank (rank_pattern) is padded with zeros
            a_blocks.append(torch.cat([pair["A"].float(), torch.zeros(pad, fin)]))
            b_blocks.append(
                torch.cat([pair["B"].float() * (w * scaling), torch.zeros(fout, pad)], 1)
            )
        tensors[f"{PREFIX}{m}.lora_A.weight"] = torch.cat(a_blocks).contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = torch.cat(b_blocks, 1).contiguous()
    first = loaded[0][0]
    total = sum(ranks)
    config = AdapterConfig(
        rank=total,
        alpha=float(total),
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        base_model=first.base_model,
        fan_in_fan_out=first.fan_in_fan_out,
        # A LoftQ adapter's share still belongs to the NF4 base: so does the combination.
        init="loftq" if any(c.init == "loftq" for c, _ in loaded) else "default",
    )
    write_adapter(Path(out), tensors, config)
    return config
