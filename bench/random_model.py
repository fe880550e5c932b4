"""Write a model with a given architecture and random weights, for benchmarks where the real
weights cannot travel (a GPU machine that reaches no hub and takes 64 MiB of files at a time).

    python bench/random_model.py CONFIG_DIR OUT_DIR
    python bench/random_model.py CONFIG_DIR OUT_DIR --shape llama3-8b --device cuda

CONFIG_DIR holds a transformers config.json and the tokenizer's files (what `save_pretrained`
writes); OUT_DIR gets the same plus random safetensors weights: N(0, 0.02) matrices, norms at 1.
`--shape` swaps in a bigger model's sizes (the vocabulary stays CONFIG_DIR's); `--device cuda`
fills the weights on the GPU (seconds instead of minutes for 8B). Speed and memory depend only
on the shapes; losses start near ln(vocabulary size).
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {  # a LLaMA's sizes: what issue 17 (8B) and issue 18 (7B, 13B) measure
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
    ),
    "llama2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        head_dim=128,
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a bigger model's sizes")
    p.add_argument("--device", default="cpu", help="where to fill the weights (cpu, cuda)")
    args = p.parse_args()

    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(args.config_dir) / "config.json").is_file():
        p.error(f"{args.config_dir}: no config.json; give a directory save_pretrained wrote")
    config = AutoConfig.from_pretrained(args.config_dir)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(config, key, value)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
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
