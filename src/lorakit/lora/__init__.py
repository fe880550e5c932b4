"""LoRA adapters: the layer (`layer.LoRALinear` over a frozen nn.Linear, GPT-2 Conv1D or
NF4Linear), which modules to adapt (`targets`), adapters on disk in PEFT's format (`peft_format`),
and the adapters in a folder (`library`)."""
