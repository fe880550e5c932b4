"""`--report-to tensorboard`: the scalars of metrics.jsonl as TensorBoard event files.

Written beside the run, in OUT/tensorboard (`tensorboard --logdir OUT`): every step's
train/loss, train/grad_norm, train/lr, train/tokens_per_s (and any other number in its row),
and eval/loss where it is measured. On `--resume` the events logged after the checkpoint are
dropped (`purge_step`), as metrics.jsonl's lines are, so the curves do not fork.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError

REPORTS = ("none", "tensorboard")
MISSING = "--report-to tensorboard needs the tensorboard package: pip install tensorboard"


def check_available() -> None:
    """Refuse `--report-to tensorboard` before the run starts when the package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401 (imports tensorboard and its protobuf)
    except ImportError as e:
        raise LorakitError(f"{MISSING} ({e})") from None


class TensorBoard:
    """Adds each metrics row's numbers as scalars at the row's step."""

    def __init__(self, logdir: Path, start_step: int) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run logs from the step after its checkpoint: what a crashed run logged
        # past that is hidden
        self.writer = SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step else None)

    def log(self, row: dict) -> None:
        step = row["step"]
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
