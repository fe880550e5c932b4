"""Data parallel training under torchrun: `torchrun --nproc-per-node N -m lorakit train ...`.

Every rank loads the same 4-bit base and starts the same adapter (same seed); each optimizer
step's micro-batches are dealt out over the ranks (`--batch-size` stays the global batch, so N
processes take the same steps as one), and after the backward passes only the adapter's
gradients are summed over the ranks: the frozen base is never sent. The loss is normalised by
the whole step's labelled tokens before backward, so the sum is the one-process gradient, and
clipping and AdamW then run identically everywhere. Rank 0 alone writes the run directory and
prints. gloo on CPU, NCCL on CUDA; torch.distributed does the talking.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LorakitError

TIMEOUT = timedelta(minutes=10)  # a rank that never answers ends the run instead of hanging it


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


ALONE = World()  # one process, no torchrun


def is_main() -> bool:
    """Whether this process prints and writes: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def ranks() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return ranks() > 1


def join(device: torch.device) -> World:
    """This process's place among torchrun's (the process group set up once); World() alone."""
    if not launched():
        return ALONE
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            # NCCL for the CUDA gradients, gloo for the few CPU scalars (settings, stop, losses)
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise LorakitError(
                f"torchrun: this rank could not reach the others ({e}); check --master-addr "
                "and --master-port, and that every node runs the same command"
            ) from None
    return World(dist.get_rank(), dist.get_world_size())


def check_same_settings(settings: str, world: World) -> None:
    """Refuse ranks started with different settings (they would train different runs)."""
    if world.size == 1:
        return
    mine = torch.tensor(list(hashlib.sha256(settings.encode()).digest()), dtype=torch.int64)
    first = mine.clone()
    dist.broadcast(first, src=0)
    different = torch.tensor([int(not torch.equal(mine, first))])
    dist.all_reduce(different)
    if int(different):
        raise LorakitError(
            f"{int(different)} rank(s) were started with settings other than rank 0's; start "
            "every rank with the same flags and files"
        )


def check_enough_work(sequences: int, passes: int, world: World) -> None:
    """Refuse more ranks than there is work to share out: the data's sequences, a step's
    passes (micro-batches)."""
    if world.size == 1:
        return
    if sequences < world.size:
        raise LorakitError(
            f"the data packs into {sequences} sequence(s), fewer than the {world.size} ranks; "
            "start fewer processes (--nproc-per-node) or give more data"
        )
    if passes < world.size:
        raise LorakitError(
            f"a step has {passes} micro-batch(es) (--batch-size / --micro-batch x --grad-accum) "
            f"for {world.size} ranks, so some would idle; raise --batch-size or lower --micro-batch"
        )


def my_share(items: list, world: World) -> list:
    """This rank's share of a step's micro-batches (every rank may get none)."""
    return items[world.rank :: world.size]


def my_passes(items: list, world: World, even: bool = False) -> list[tuple[object, float]]:
    """This rank's share as (micro-batch, loss weight) pairs. `even` (a sharded base, whose
    every pass gathers with all ranks): every rank runs the same number of passes, a rank short
    of micro-batches repeating one at weight 0 (its gradients add nothing)."""
    share = [(item, 1.0) for item in my_share(items, world)]
    if even and items:
        share += [(items[0], 0.0)] * (-(-len(items) // world.size) - len(share))
    return share


def sum_gradients(params: list[nn.Parameter], world: World) -> None:
    """Sum the adapter's gradients over the ranks, in one flat all-reduce."""
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()


def sum_floats(values: list[float], world: World) -> list[float]:
    """Per-value sums over the ranks (losses, token counts)."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if it is true on any (Ctrl-C on one node stops all together)."""
    return bool(sum_floats([float(flag)], world)[0]) if world.size > 1 else flag


class SilentMetrics:
    """metrics.jsonl as ranks other than 0 keep it: not at all."""

    path = None

    def __init__(self, *args: object) -> None:
        pass

    def log(self, row: dict) -> None:
        pass

    def lines(self) -> int:
        return 0

    def finish(self, png: object) -> None:
        pass

    def close(self) -> None:
        pass


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def leave() -> None:
    """End this process's part in the process group (where torchrun started one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
