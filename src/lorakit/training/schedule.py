"""Learning-rate schedules: linear warmup to the peak, then cosine or linear decay to 0, or a
constant rate. A warmup given below 1 is a fraction of the steps.

Short runs are where schedules hurt: with packing, `--batch-size 16 --seq-len 512` takes 8,192
tokens a step, so one epoch over 160 short examples is 3 steps, of which warmup and cosine decay
leave about one at the peak rate. `short_run_note` says so before the run starts.
"""

from __future__ import annotations

import math

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


def short_run_note(total: int, schedule: str, sequences_per_step: int) -> str | None:
    """A warning for a run of fewer than FEW_STEPS optimizer steps, naming the fixes."""
    if total >= FEW_STEPS:
        return None
    fix = "more --epochs or --steps, or a smaller --batch-size"
    if schedule != "constant":
        fix += f"; or --schedule constant (the {schedule} decay spends much of a short run)"
    return (
        f"warning: only {total} optimizer step(s) of {sequences_per_step} packed sequence(s) "
        f"each; fewer than {FEW_STEPS} steps rarely learn much: use {fix}"
    )
