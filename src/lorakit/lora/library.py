"""The adapter library: every adapter directory under a folder, with its base, rank, targets,
size and training metrics (`lorakit adapters`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig


def adapter_library(
    folder: str | os.PathLike, base: str | None = None, depth: int | None = None
) -> list[dict]:
    """Every adapter directory under `folder` (at most `depth` folders down, hidden ones
    skipped, when given): name, base, rank, targets, size, training metrics."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorakitError(f"{folder} is not a directory")
    if depth is None:
        found = folder.rglob(CONFIG_NAME)
    else:
        found = [f for d in range(depth + 1) for f in folder.glob("*/" * d + CONFIG_NAME)]
        found = [
            f for f in found if not any(p.startswith(".") for p in f.relative_to(folder).parts)
        ]
    rows = []
    for config_file in sorted(found):
        path = config_file.parent
        try:
            config = AdapterConfig.from_peft(json.loads(config_file.read_text()), str(config_file))
        except (LorakitError, json.JSONDecodeError, ValueError) as e:
            rows.append(
                {
                    "name": str(path.relative_to(folder)),
                    "base_model": None,
                    "rank": "?",
                    "targets": "",
                    "size_mb": 0.0,
                    "steps": None,
                    "eval_loss": None,
                    "warning": f"{path}: unreadable adapter ({e})",
                }
            )
            continue
        weights = path / WEIGHTS_NAME
        steps, eval_loss = _training_metrics(path)
        targets = config.target_modules
        parameters = sorted(config.target_parameters)  # mixture-of-experts weights
        row = {
            "name": str(path.relative_to(folder)) if path != folder else path.name,
            "path": str(path),
            "base_model": config.base_model,
            "rank": config.rank,
            "targets": ",".join(
                [targets, *parameters]
                if isinstance(targets, str)
                else [*sorted(targets), *parameters]
            ),
            "size_mb": weights.stat().st_size / 1e6 if weights.is_file() else 0.0,
            "steps": steps,
            "eval_loss": eval_loss,
        }
        if base is not None and config.base_model not in (None, base):
            row["warning"] = f"{row['name']} was trained on {config.base_model}, not {base}"
        rows.append(row)
    return rows


def _training_metrics(path: Path) -> tuple[int | None, float | None]:
    """(steps, final eval loss) from a lorakit run's metrics.jsonl, if there is one."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return None, None
    steps, eval_loss = None, None
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        steps = row.get("step", steps)
        eval_loss = row.get("eval_loss", eval_loss)
    return steps, eval_loss
