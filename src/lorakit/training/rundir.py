"""The training output directory: checkpoints, metrics, loss curve, model card and the run's
summary.

Checkpoints are one safetensors file (never pickle) holding the adapter, AdamW's state, the RNG
and the step, written to a temporary file, synced to disk and renamed: Ctrl-C, kill -9, a
power cut or a full disk leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.atomic import (
    atomic_write,
    atomic_write_text,
    check_can_create,
    fix_for,
    make_dir,
)
from lorakit.errors import LorakitError
from lorakit.training.tensorboard import TensorBoard

RUN_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "metrics.jsonl",
    "loss.png",
    "train_config.json",
    "README.md",
)


def save_checkpoint(path: Path, model: nn.Module, optimizer, step: int, metrics_lines: int) -> None:
    from safetensors.torch import save_file

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    tensors = {f"param.{n}": params[n].detach().cpu().contiguous() for n in names}
    state = optimizer.state_dict()["state"]
    for i, n in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            if i in state:
                tensors[f"adam.{key}.{n}"] = state[i][key].cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    meta = {
        "step": step,
        "adam_step": float(state[0]["step"]) if state else 0.0,
        "metrics_lines": metrics_lines,
    }
    path.mkdir(parents=True, exist_ok=True)
    # One file, one rename: the step and the tensors it belongs to are committed together, so a
    # kill -9 or a power cut at any moment leaves the previous checkpoint or this one, whole.
    text, before = {k: str(v) for k, v in meta.items()}, _saved_step(path)
    try:
        atomic_write(path / "state.safetensors", lambda tmp: save_file(tensors, tmp, metadata=text))
    except LorakitError as e:
        kept = "no earlier checkpoint" if before is None else f"the step-{before} one is intact"
        raise LorakitError(f"checkpoint of step {step} not saved: {e} ({kept})") from None
    with contextlib.suppress(LorakitError):  # a copy to read; the checkpoint is complete without
        atomic_write_text(path / "state.json", json.dumps(meta) + "\n")


def _saved_step(path: Path) -> int | None:
    """The step of the checkpoint in `path`, or None where there is none (or it is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / "state.safetensors"), "pt") as f:
            meta = f.metadata() or {}
        if "step" not in meta:  # an earlier lorakit's checkpoint
            meta = json.loads((path / "state.json").read_text())
        return int(meta["step"])
    except Exception:  # noqa: BLE001 - any unreadable file: no step to name
        return None


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path / "state.safetensors"), "pt") as f:
            meta = f.metadata() or {}
        if "step" not in meta:  # written before lorakit kept the step in the tensors' file
            meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        meta = {
            "step": int(meta["step"]),
            "adam_step": float(meta["adam_step"]),
            "metrics_lines": int(meta["metrics_lines"]),
        }
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise LorakitError(
            f"checkpoint {path} is unreadable or corrupt ({e}); start over with --overwrite"
        ) from None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    for n in names:
        saved = tensors.get(f"param.{n}")
        if saved is None or saved.shape != params[n].shape:
            why = (
                f"it has no {n}"
                if saved is None
                else f"{n} is {tuple(saved.shape)} there, {tuple(params[n].shape)} here"
            )
            raise LorakitError(
                f"checkpoint {path} does not match this run's adapter ({why}); resume with the "
                "same --model, --targets and --rank, or start over with --overwrite"
            )
    wanted = ["rng.cpu"]
    if meta["step"] > 0:
        wanted += [f"adam.{k}.{n}" for n in names for k in ("exp_avg", "exp_avg_sq")]
    lost = [k for k in wanted if k not in tensors]
    if lost:
        raise LorakitError(
            f"checkpoint {path} is incomplete (no {lost[0]}); start over with --overwrite"
        )
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[f"param.{n}"])
    if meta["step"] > 0:
        sd = optimizer.state_dict()
        sd["state"] = {
            i: {
                "step": torch.tensor(meta["adam_step"]),
                "exp_avg": tensors[f"adam.exp_avg.{n}"].to(params[n].device),
                "exp_avg_sq": tensors[f"adam.exp_avg_sq.{n}"].to(params[n].device),
            }
            for i, n in enumerate(names)
        }
        optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.cpu"])
    return meta


def check_out_dir(cfg) -> Path:
    """Refuse an output directory (of `cfg`, a TrainConfig) that would clobber an earlier run,
    that --resume cannot resume from, or that cannot be written; changes nothing on disk."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; give a directory")
    holds_run = out.is_dir() and any(
        (out / f).exists() for f in ("adapter_config.json", "metrics.jsonl", "checkpoint")
    )
    if holds_run and not (cfg.resume or cfg.overwrite):
        raise LorakitError(
            f"{out} already holds a training run; use --resume to continue it, --overwrite to "
            "replace it, or --out to choose another directory"
        )
    if cfg.resume:
        if not any((out / "checkpoint" / f).is_file() for f in ("state.safetensors", "state.json")):
            raise LorakitError(f"--resume: {out} has no checkpoint to resume from")
        _check_same_adapter(out, cfg)
    check_can_create(out, "--out")
    return out


def _check_same_adapter(out: Path, cfg) -> None:
    """--resume with another --rank or --targets (the checkpoint's tensors cannot fit), --init
    (the adapter would say it is what it is not) or --schedule (another run). Checked
    against the run's train_config.json before the model loads (load_checkpoint checks the
    tensors themselves after)."""
    try:
        saved = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError):
        return  # no readable record: load_checkpoint still compares the tensors
    for key in ("rank", "targets", "init", "schedule"):
        flag = "--" + key
        if key in saved and saved[key] != getattr(cfg, key):
            raise LorakitError(
                f"--resume: the run in {out} was trained with {flag} {saved[key]}, not "
                f"{getattr(cfg, key)}; resume with {flag} {saved[key]}, or start over with "
                "--overwrite"
            )


def prepare_out_dir(cfg) -> Path:
    """The output directory of `cfg`, checked (`check_out_dir`) and created; with --overwrite
    the earlier run's files are deleted, so call it once every other check has passed."""
    out = check_out_dir(cfg)
    if cfg.overwrite and not cfg.resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)  # --report-to tensorboard's
    if cfg.resume:  # what a killed run was writing when it died: never complete, never read
        for stale in [*out.glob(".*.tmp"), *(out / "checkpoint").glob(".*.tmp")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return make_dir(out, "--out")


class Metrics:
    """metrics.jsonl: one JSON row per step or evaluation, appended as the run goes."""

    def __init__(
        self, path: Path, resume_lines: int | None, report_to: str = "none", start: int = 0
    ) -> None:
        self.path = path
        # --report-to tensorboard: the same rows as events (from `start`, the step resumed at)
        self.tensorboard = (
            TensorBoard(path.parent / "tensorboard", start)
            if (report_to == "tensorboard")
            else None
        )
        if resume_lines is None:
            atomic_write_text(path, "")
        else:  # drop what was logged after the checkpoint we resume from
            kept = path.read_text().splitlines()[:resume_lines] if path.is_file() else []
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log(self, row: dict) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())  # a checkpoint counts these lines: they must outlive a crash
        except OSError as e:
            raise LorakitError(
                f"could not write {self.path}: {e.strerror or e}; {fix_for(e)} (the last "
                "checkpoint is intact: --resume continues from it)"
            ) from None
        if self.tensorboard is not None:
            self.tensorboard.log(row)

    def close(self) -> None:
        """The TensorBoard events closed (the run ended, or failed)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def finish(self, png: Path) -> None:
        """The loss curve drawn, the TensorBoard events closed."""
        self.close()
        plot_losses(self.path, png)

    def lines(self) -> int:
        return count_lines(self.path)


def plot_losses(metrics_file: Path, png: Path) -> None:
    """The loss curve as a picture: train loss per step, eval loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


LOFTQ_CARD = """
**This adapter belongs to the NF4 (4-bit) base.** It was initialised with LoftQ from the part
of each weight that 4-bit quantization lost, so it corrects the NF4 base's error: use it on the
base loaded in 4 bits (NF4, blocksize 64, double quantization: bitsandbytes' layout), and merge
it into the dequantized NF4 weights (`lorakit merge` does so by itself), not the 16-bit ones,
which would count the correction twice.
"""


def write_model_card(out: Path, cfg, base: str, r) -> None:
    """README.md for the adapter: what it is, how it was trained, how to use it."""

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    card = f"""# LoRA adapter for {base}

Trained with lorakit ({"QLoRA, NF4 base" if cfg.quant == "nf4" else "LoRA, full-precision base"}).

| | |
|---|---|
| base model | `{base}` |
| data | `{cfg.data or "embedded Jargon File 4.4.7 instructions"}` |
| rank / alpha / dropout | {cfg.rank} / {cfg.alpha} / {cfg.dropout} |
| init / schedule | {cfg.init} / {cfg.schedule} |
| targets | `{cfg.targets}` |
| steps | {r.steps} ({cfg.batch_size} x {cfg.grad_accum} sequences of {cfg.seq_len} tokens) |
| eval loss before -> after | {fmt(r.first_eval_loss)} -> {fmt(r.final_eval_loss)} |
| final train loss | {fmt(r.final_train_loss)} |
| adapter size | {r.adapter_mb:.1f} MB |

## Use it

    lorakit generate --model {cfg.model} --adapter {out} --prompt "..."

or with transformers + PEFT:

    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model, "{out}")

The files are PEFT's: `adapter_config.json`, `adapter_model.safetensors`. `train_config.json`
holds every setting of this run; `metrics.jsonl` and `loss.png` the loss curve.
{LOFTQ_CARD if cfg.init == "loftq" else ""}"""
    atomic_write_text(out / "README.md", card)


@dataclass
class TrainResult:
    """What a run produced, for the CLI's summary and for tests."""

    out: Path
    steps: int
    first_eval_loss: float | None
    final_eval_loss: float | None
    final_train_loss: float | None
    tokens_per_s: float
    wall_s: float
    adapter_mb: float
    interrupted: bool = False


def summarize(
    out: Path, steps: int, tokens_per_s: float, wall: float, interrupted: bool
) -> TrainResult:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    return TrainResult(
        out=out,
        steps=steps,
        first_eval_loss=evals[0] if evals else None,
        final_eval_loss=evals[-1] if len(evals) > 1 else None,
        final_train_loss=losses[-1] if losses else None,
        tokens_per_s=tokens_per_s,
        wall_s=wall,
        adapter_mb=(out / "adapter_model.safetensors").stat().st_size / 1e6,
        interrupted=interrupted,
    )
