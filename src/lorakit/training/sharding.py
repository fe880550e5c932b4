"""The frozen 4-bit base sharded over torchrun's ranks (`lorakit train --shard-base`), FSDP2.

Data parallel (training.distributed) keeps a whole base on every rank. A base bigger than one
device is split instead: every NF4 layer's codes and scales become frozen parameters in whole
super-blocks (`NF4Linear.as_blocks`), and PyTorch's FSDP2 (`fully_shard`) keeps 1/N of them on
each rank, gathering one decoder layer's 4-bit weights just before it runs (forward, and again
in backward) and freeing them after. What travels is the 4-bit state (~4.1 bits a weight), never
a 16-bit copy. The rest of the base (embeddings, final norm, output head) stays whole on every
rank, as in data parallel: the loss uses the head for the whole step, and sharding the
embeddings would add a gathered copy (and, for a head tied to them, keep the original too).
The transformer around the layers (`model.base_model`, what the training loss calls) is the
outer FSDP unit, which owns the forward and backward hooks. The adapter stays outside FSDP
(`ignored_params`): each rank holds all of it, a few MB, and its gradients are summed as in data
parallel, so checkpoints, resume and the saved adapter are unchanged.

Every gather is a collective: all ranks must run the same passes. A rank whose share of a
step's micro-batches is shorter runs a pass of zero weight (`distributed.my_passes`), and eval
runs on every rank.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.targets import layer_stack
from lorakit.quant.experts import NF4Experts
from lorakit.quant.linear import NF4Linear
from lorakit.training.distributed import World


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (`model.layers`, `h`, ...: `targets.layer_stack`)."""
    name = layer_stack(model)
    if name is None:
        raise LorakitError(
            f"--shard-base: no stack of decoder layers found in {type(model).__name__}; train "
            "without --shard-base"
        )
    return model.get_submodule(name)


@dataclass(frozen=True)
class Sharded:
    layers: int  # NF4 layers split
    held: int  # bytes of their 4-bit state this rank holds
    total: int  # bytes of it over all ranks (without the padding of the last super-block)
    whole: int = 0  # bytes of 4-bit experts (a mixture of experts' layers), not split

    def note(self, world: World) -> str:
        experts = (
            f"; the experts' 4-bit weights ({self.whole / 2**20:.1f} MB) stay whole on every rank"
            if self.whole
            else ""
        )
        return (
            f"base sharded: {self.layers} 4-bit layers split over {world.size} ranks; rank "
            f"{world.rank} holds {self.held / 2**20:.1f} of their {self.total / 2**20:.1f} MB"
            + experts
        )


def shard_base(model: nn.Module, world: World, device_type: str) -> Sharded:
    """Shard the model's NF4 base over the ranks (FSDP2 units: each decoder layer, then the
    transformer around them), the adapter left whole on every rank; returns what was split and
    what this rank holds of it. Moves what FSDP holds to the ranks' device (a CUDA rank's own
    GPU)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise LorakitError(
            f"--shard-base needs PyTorch 2.7 or later (FSDP2 with ignored_params); this is "
            f"{torch.__version__}: upgrade torch, or drop --shard-base"
        )

    body = model.base_model  # what training.loss calls: the units' hooks must run in it
    layers = [m for m in body.modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise LorakitError(
            "--shard-base splits a 4-bit base; this run's base is not in NF4 (--quant none): "
            "use --quant nf4 or drop --shard-base"
        )
    total = sum(layer.state.nbytes for layer in layers)
    mesh = init_device_mesh(device_type, (world.size,))
    stack = decoder_layers(body)
    in_stack = {id(p) for p in stack.parameters()}
    # Left whole on every rank: the adapter, and what sits outside the decoder layers
    # (embeddings, final norm): sharded, the embeddings would also be gathered for the whole
    # step, and an output head tied to them would keep the original besides.
    whole = {p for p in model.parameters() if p.requires_grad or id(p) not in in_stack}
    # Layer by layer: a decoder layer's whole 4-bit state exists (as_blocks copies it) only until
    # fully_shard has kept this rank's rows, so no rank ever holds the whole base.
    try:
        for unit in [*stack, body]:
            for layer in unit.modules():
                if isinstance(layer, NF4Linear):
                    layer.as_blocks()
            fully_shard(unit, mesh=mesh, ignored_params=whole)
    except (AssertionError, ValueError, RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorakitError(
            f"--shard-base could not shard {type(model).__name__} ({first}); train without it"
        ) from None
    held = sum(
        p.to_local().nbytes
        for layer in layers
        for p in (layer.packed, layer.absmax, layer.absmax_scale)
        if p is not None
    )
    experts = sum(
        sum(b.nbytes for b in m.buffers()) for m in body.modules() if isinstance(m, NF4Experts)
    )
    return Sharded(len(layers), held, total, experts)
