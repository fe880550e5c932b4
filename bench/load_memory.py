"""Peak memory of loading a model: lorakit's streaming NF4 load vs transformers' fp32 load
(for a checkpoint stored in 4 bits: transformers + bitsandbytes loading it as it is).

Each load runs in its own fresh Python process, so each peak (ru_maxrss) is that load's alone.
The "after imports" column is the same process's peak before loading (python + torch +
transformers), so "load" = peak - imports is what the load itself added; "held after" is the
resident size once the load returned (what the process keeps while the model lives).

    python bench/load_memory.py                 # the embedded default model (smollm2)
    python bench/load_memory.py --model DIR_OR_GGUF
    python bench/load_memory.py --model NF4_DIR --codes-read   # + lorakit reading the codes

A 4-bit checkpoint's codes stay memory-mapped in lorakit (not read until a layer runs);
`--codes-read` adds a lorakit load that reads them into memory, as lorakit did before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# The code each child process runs; it prints one JSON line.
CHILD = r"""
import json, resource, sys, time
import torch, transformers  # noqa: F401  (import cost is measured apart from the load)
import lorakit.models.loading as loading

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

which, spec = sys.argv[1], sys.argv[2]
source = loading.resolve_model(spec)
before = peak_mb()
start = time.perf_counter()
if which.startswith("lorakit"):
    if which == "lorakit-read":
        from lorakit.models import checkpoint
        checkpoint.Entry.map = lambda entry, maps: entry.read()
    model, _, _ = loading.load_model(spec, quant="nf4", with_tokenizer=False)
else:
    from transformers import AutoModelForCausalLM
    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            source.path.parent, gguf_file=source.path.name, dtype=torch.float32)
    else:  # a 4-bit checkpoint loads in 4 bits (bitsandbytes)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch.float32, device_map="cpu")
seconds = time.perf_counter() - start
held_mb = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
print(json.dumps({"imports_mb": before, "peak_mb": peak_mb(), "seconds": seconds,
                  "held_mb": held_mb,
                  "tensors_mb": sum(t.numel() * t.element_size() for t in
                                    list(model.parameters()) + list(model.buffers())) / 2**20}))
"""


def runs(model: str, codes_read: bool) -> dict[str, str]:
    """The loads to measure, by the child's name for them."""
    from lorakit.models.loading import load_config, resolve_model
    from lorakit.quant.bnb_format import is_prequantized

    source = resolve_model(model)
    four_bit = source.kind != "gguf" and is_prequantized(load_config(source), source.path)
    out = {"lorakit-nf4": "lorakit load_model(quant='nf4')"}
    if codes_read:
        out["lorakit-read"] = "lorakit, the codes read into memory"
    out["transformers"] = (
        "transformers + bitsandbytes 4-bit" if four_bit else "transformers from_pretrained fp32"
    )
    return out


def measure(which: str, model: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, model], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(f"{which} failed:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model dir, .gguf file or alias")
    parser.add_argument("--codes-read", action="store_true", help="also lorakit reading codes")
    args = parser.parse_args()

    print(f"model: {args.model}")
    header = f"{'load':<36}{'peak RSS':>10}{'after imports':>15}{'load adds':>11}"
    header += f"{'held after':>12}{'tensors':>9}{'time':>8}"
    print(header)
    for which, label in runs(args.model, args.codes_read).items():
        r = measure(which, args.model)
        print(
            f"{label:<36}{r['peak_mb']:>7.0f} MB{r['imports_mb']:>12.0f} MB"
            f"{r['peak_mb'] - r['imports_mb']:>8.0f} MB{r['held_mb']:>9.0f} MB"
            f"{r['tensors_mb']:>6.0f} MB"
            f"{r['seconds']:>7.1f}s"
        )


if __name__ == "__main__":
    main()
