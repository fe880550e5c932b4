"""Learning-rate schedules: linear warmup to the peak, then cosine or linear decay to 0, or a
constant rate. A warmup given below 1 is a fraction of the steps.

Short runs are where schedules hurt: with packing, `--batch-size 16 --seq-len 512` takes 8,192
tokens a step, so one epoch over 160 short examples is 3 steps, of which warmup and cosine decay
leave about one at the peak rate. `short_run_note` says so before the run starts.
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")
FEW_STEPS = 20  # below this, warmup + decay take much of what the run can learn


def warmup_steps(warmup: float, total: int) -> int:
    """--warmup as steps: a fraction of `total` when below 1, else a number of steps."""
    return int(warmup * total) if warmup < 1 else int(warmup)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """The multiplier of the peak rate at optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1 + math.cos(math.pi * progress))


def short_run_note(total: int, cfg: Any) -> str | None:
    """A warning for a run (a TrainConfig) of fewer than FEW_STEPS optimizer steps, with the
    fixes that apply to it."""
    if total >= FEW_STEPS:
        return None
    per_step = cfg.batch_size * cfg.grad_accum
    fixes = ["more --steps"] if cfg.steps else ["more --epochs", "a smaller --batch-size"]
    if cfg.schedule != "constant":
        fixes.append(f"--schedule constant (the {cfg.schedule} decay spends much of a short run)")
    return (
        f"warning: only {total} optimizer step(s) of {per_step} packed sequence(s) each; fewer "
        f"than {FEW_STEPS} steps rarely learn much: use {', or '.join(fixes)}"
    )
