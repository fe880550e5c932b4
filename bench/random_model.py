"""Write a model with a given architecture and random weights, for benchmarks where the real
weights cannot travel (a GPU machine that reaches no hub and takes 64 MiB of files at a time).

    python bench/random_model.py CONFIG_DIR OUT_DIR
    python bench/random_model.py CONFIG_DIR OUT_DIR --shape llama3-8b --device cuda
    python bench/random_model.py CONFIG_DIR OUT_DIR --shape llama-30b --nf4

CONFIG_DIR holds a transformers config.json and the tokenizer's files (what `save_pretrained`
writes); OUT_DIR gets the same plus random safetensors weights: N(0, 0.02) matrices, norms at 1.
`--shape` swaps in a bigger model's sizes (the vocabulary stays CONFIG_DIR's); `--device cuda`
fills the weights on the GPU (seconds instead of minutes for 8B). `--nf4` writes what
`lorakit quantize` would write for it, one tensor at a time: a 33B model in NF4 (17 GB) without
ever holding 66 GB of bf16. Speed and memory depend only on the shapes; losses start near
ln(vocabulary size).
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {  # a LLaMA's sizes: what issue 17 (8B) and issue 18 (1B, 7B, 13B, 33B, 70B) measure
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=False,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "llama2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "llama-30b": dict(
        hidden_size=6656,
        intermediate_size=17920,
        num_hidden_layers=60,
        num_attention_heads=52,
        num_key_value_heads=52,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "llama2-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


def random_tensors(model, seed: int):  # noqa: ANN001, ANN201
    """(name, bf16 tensor) for each parameter of `model` (on meta), one at a time: matrices
    N(0, 0.02), vectors 1 (norms)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # tied parameters come once
        if param.dim() > 1:
            t = torch.empty(param.shape).normal_(0, 0.02, generator=generator)
            yield name, t.to(torch.bfloat16)
        else:
            yield name, torch.ones(param.shape, dtype=torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a bigger model's sizes")
    p.add_argument("--device", default="cpu", help="where to fill the weights (cpu, cuda)")
    p.add_argument("--nf4", action="store_true", help="write it in NF4, as lorakit quantize does")
    args = p.parse_args()

    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(args.config_dir) / "config.json").is_file():
        p.error(f"{args.config_dir}: no config.json; give a directory save_pretrained wrote")
    config = AutoConfig.from_pretrained(args.config_dir)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(config, key, value)
    if args.nf4:
        from lorakit.models.loading import empty_model
        from lorakit.models.quantized import write_quantized

        config.dtype = torch.bfloat16
        model = empty_model(config)
        Path(args.out_dir).mkdir(parents=True, exist_ok=False)
        write_quantized(model, random_tensors(model, args.seed), Path(args.out_dir), progress=True)
        AutoTokenizer.from_pretrained(args.config_dir).save_pretrained(args.out_dir)
        n = sum(p.numel() for p in model.parameters())
        print(f"{args.out_dir}: {config.model_type}, {n / 1e6:.1f}M parameters, random, NF4")
        return
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
