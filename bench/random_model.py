"""Write a model with a given architecture and random weights, for benchmarks where the real
weights cannot travel (a GPU machine that reaches no hub and takes 64 MiB of files at a time).

    python bench/random_model.py CONFIG_DIR OUT_DIR

CONFIG_DIR holds a transformers config.json and the tokenizer's files (what `save_pretrained`
writes); OUT_DIR gets the same plus random safetensors weights: N(0, 0.02) matrices, norms at 1.
Speed and memory depend only on the shapes; losses start near ln(vocabulary size).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(args.config_dir) / "config.json").is_file():
        p.error(f"{args.config_dir}: no config.json; give a directory save_pretrained wrote")
    config = AutoConfig.from_pretrained(args.config_dir)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    model.save_pretrained(args.out_dir)
    AutoTokenizer.from_pretrained(args.config_dir).save_pretrained(args.out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out_dir}: {config.model_type}, {n / 1e6:.1f}M parameters, random")


if __name__ == "__main__":
    main()
