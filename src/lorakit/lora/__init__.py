"""LoRA adapters: the layer (`layer.LoRALinear` over a frozen nn.Linear, GPT-2 Conv1D or
NF4Linear; `experts.LoRAExperts` over a mixture-of-experts layer's fused expert weights), which
modules to adapt (`targets`), the model's anatomy as `lorakit inspect` shows it (`anatomy`),
adapters on disk in PEFT's format (`peft_format`), and the adapters in a folder (`library`)."""
