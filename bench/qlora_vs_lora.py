"""QLoRA (NF4 base), QLoRA with LoftQ's init, and plain LoRA (16-bit base): same data, steps,
lr and seed.

The QLoRA paper's claim is parity: 4-bit NF4 with double quantization loses (almost) nothing
against a 16-bit base; LoftQ (`lorakit train --init loftq`) starts the adapter at the NF4 base's
error to close what is left. This trains the three one after the other in one process and
prints a Markdown table: eval loss before and after, the ratio of each final eval loss to plain
LoRA's, and the time LoftQ's init took.

    python bench/qlora_vs_lora.py                       # the default run: 30 steps x 4 x 512
    python bench/qlora_vs_lora.py --data pydoc --steps 20 --seq-len 256

`--data pydoc` writes a second instruction set from this Python's own standard library, no
download: "In Python, what does json.dumps do?" -> the first paragraph of its docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import re
import resource
import tempfile
import time
from pathlib import Path

from lorakit.models.loading import load_model
from lorakit.training.trainer import TrainConfig, train

VARIANTS = {  # name: (quant, init)
    "NF4 (QLoRA)": ("nf4", "default"),
    "NF4 + LoftQ": ("nf4", "loftq"),
    "16-bit (LoRA)": ("none", "default"),
}
PYDOC_MODULES = (
    "array",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "copy",
    "csv",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "math",
    "mimetypes",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tempfile",
    "textwrap",
    "threading",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "zipfile",
    "zlib",
)


def pydoc_instructions(path: Path) -> int:
    """Write the standard library's documented functions and classes as instructions."""
    rows = []
    for module_name in PYDOC_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            if len(first) < 20 or re.match(r"^[\w.]+\(.*\)( -> .*)?$", first):
                continue  # no docstring, or only a signature
            question = f"In Python, what does {module_name}.{name} do?"
            rows.append({"instruction": question, "output": first[:400]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", help="JSONL file, or pydoc (default: the embedded data)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--targets", default="default")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qlora-vs-lora-"))
    data = args.data
    if data == "pydoc":
        data = str(work / "pydoc.jsonl")
        print(f"pydoc instruction set: {pydoc_instructions(Path(data))} examples in {data}")
    rows = []
    for name, (quant, init) in VARIANTS.items():
        model, tok, source = load_model(args.model, quant=quant)
        cfg = TrainConfig(
            model=args.model,
            data=data,
            quant=quant,
            init=init,
            steps=args.steps,
            out=str(work / f"{quant}-{init}"),
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
            lr=args.lr,
            targets=args.targets,
            rank=args.rank,
            save_every=0,
        )
        said = io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stdout(said):
            r = train(cfg, model, tok, source.name, progress=False)
        wall = time.perf_counter() - t
        init_s = re.search(r"LoftQ init: \d+ layers in ([0-9.]+)s", said.getvalue())
        rows.append((name, r, wall, float(init_s.group(1)) if init_s else None))
        print(f"{name}: eval loss {r.first_eval_loss:.4f} -> {r.final_eval_loss:.4f}", flush=True)
        del model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nmodel {args.model}, data {args.data or 'embedded'}, {args.steps} steps x "
        f"{args.batch_size} x {args.seq_len} tokens, lr {args.lr:g}, r={args.rank} on "
        f"{args.targets}, seed {args.seed}; peak RSS {peak:.0f} MB\n"
    )
    reference = rows[-1][1].final_eval_loss
    print(
        "| base / init | eval loss before | eval loss after | after / 16-bit LoRA "
        "| LoftQ init s | wall s |"
    )
    print("|---|---|---|---|---|---|")
    for name, r, wall, init_s in rows:
        ratio = r.final_eval_loss / reference
        print(
            f"| {name} | {r.first_eval_loss:.4f} | {r.final_eval_loss:.4f} | {ratio:.4f} "
            f"({(ratio - 1) * 100:+.2f}%) | {f'{init_s:.1f}' if init_s else '-'} | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
