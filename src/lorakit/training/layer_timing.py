"""How long a decoder layer of a model takes to train here, timed on one random layer.

`lorakit plan` predicts a step's time before any weight is read. Counting matmul FLOPs at the
machine's matmul rate leaves out everything else a QLoRA step does (dequantizing the NF4
weights, attention, norms, the recomputed forward under checkpointing, the adapter's small
matmuls), and on a 13B it predicted a step 7x faster than the run. So the plan builds the model's
architecture with one decoder layer (of the kind most of its layers are) and a small vocabulary,
fills it with random weights of the real shapes (NF4 as `load_model` stores them), attaches the
adapter the targets put on a layer, and times one training pass as `lorakit train` runs it (its
patches, checkpointing and weight cache as the plan chose), the layer's input carrying a gradient
as it does in every layer above the lowest adapted one; the layers below that one run forward
only, timed so.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.targets import (
    experts_weights,
    layer_stack,
    linear_modules,
    lowest_adapted_layer,
    resolve_targets,
)
from lorakit.models.loading import eager_experts, empty_model, put_weight, quantizable_modules
from lorakit.models.precision import autocast
from lorakit.training.config import TrainConfig
from lorakit.training.loss import causal_lm_loss

VOCAB = 256  # the cut model's vocabulary: its embedding and head cost next to nothing


def one_layer_config(config):  # noqa: ANN001, ANN201 (a transformers config)
    """A copy of `config` with one decoder layer of the kind most of the model's layers are
    (per-layer lists such as `layer_types` cut to their most common entry; a MoE's dense layers,
    `first_k_dense_replace` / `mlp_only_layers`, dropped when they are the fewer) and VOCAB
    tokens."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    layers = text.num_hidden_layers
    for key, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == layers:  # layer_types and the like
            common = Counter(map(repr, value)).most_common(1)[0][0]
            setattr(text, key, [next(v for v in value if repr(v) == common)])
    text.num_hidden_layers = 1
    if getattr(text, "first_k_dense_replace", 0) and text.first_k_dense_replace < layers / 2:
        text.first_k_dense_replace = 0
    dense = getattr(text, "mlp_only_layers", None)
    if isinstance(dense, list) and len(dense) < layers / 2:
        text.mlp_only_layers = []
    text.vocab_size = VOCAB
    text.pad_token_id = None  # an id past VOCAB would be refused as the embedding's padding
    return config


def random_layer_model(
    config, device: torch.device, dtype: torch.dtype, quant: str = "nf4"
) -> nn.Module:  # noqa: ANN001
    """`one_layer_config(config)`'s model with random weights, its linear layers in NF4 when
    `quant` is nf4, frozen, on `device`: what `load_model` would give for such a checkpoint."""
    model = empty_model(one_layer_config(config))
    quantize = quantizable_modules(model) if quant == "nf4" else set()
    gen = torch.Generator(device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        if p.dim() == 1:  # norms at 1, biases at 0
            t = (torch.ones if name.endswith("weight") else torch.zeros)(p.shape, device=device)
        else:
            t = torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 0.02
        put_weight(model, name, t, dtype, quantize)
        del t
    model.tie_weights()
    eager_experts(model)
    model.to(device)
    return model.requires_grad_(False)


@dataclass(frozen=True)
class LayerTime:
    """A training pass's seconds in one decoder layer, and how many layers need its backward."""

    trained: float  # forward and backward: a layer at or above the lowest adapted one
    forward: float  # forward only: a layer below every adapter, which backward never reaches
    trained_layers: int  # the layers from the lowest adapted one up
    outside: float = 0.0  # the pass outside the layers (embedding, final norm, loss), once a pass


def _in_first_layer(names: list[str], stack: str | None, cut: nn.Module) -> list[str]:
    """The adapted modules' names moved to layer 0 of `stack`, those the one-layer model `cut`
    has (a layer of another kind, a dense one in a MoE, has others); a LorakitError if none."""
    have = {*linear_modules(cut), *experts_weights(cut)}
    moved = set()
    for name in names:
        if stack is not None and name.startswith(stack + "."):
            _, _, rest = name[len(stack) + 1 :].partition(".")
            name = f"{stack}.0.{rest}"
        if name in have:
            moved.add(name)
    if not moved:
        raise LorakitError(
            f"none of the {len(names)} adapted modules (first: {names[0]}) is in a layer of "
            "the kind timed; no speed estimate for this model (the memory estimate stands)"
        )
    return sorted(moved)


def best_of(timed: Callable[[], float], short: float = 2.0) -> float:
    """The least of three runs of `timed` (seconds) if the first is under `short`, else the
    first: a short pass is noisy, a long one costs the user's wait."""
    first = timed()
    return min(first, timed(), timed()) if first < short else first


def layer_time(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    micro: int,
    checkpointing: bool,
    cache: bool,
) -> LayerTime:
    """One decoder layer of `model` (on meta: its config is what counts) trained here for a pass
    of `micro` sequences of cfg.seq_len tokens, with the adapter cfg.targets puts on that
    layer; best of the timed passes."""
    from lorakit.training.trainer import attach_adapter, training_setup

    selected, _ = resolve_targets(model, cfg.targets)
    lowest = lowest_adapted_layer(model, selected)
    cut = random_layer_model(model.config, device, dtype, cfg.quant)
    targets = _in_first_layer(selected, layer_stack(model), cut)
    run = replace(
        cfg,
        init="default",
        targets=",".join(targets),
        grad_checkpointing="on" if checkpointing else "off",
        cache_weights="on" if cache else "off",
        memory=None,
    )
    attach_adapter(cut, run)
    cut.train()
    # Above the lowest adapted layer a layer's input carries a gradient, so its backward also
    # computes the input's (the frozen weights' transposed matmuls): the timed layer does too.
    embeddings = cut.get_input_embeddings()
    needs_grad = embeddings.register_forward_hook(
        lambda module, args, out: out.requires_grad_(True) if torch.is_grad_enabled() else out
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def one_pass(tokens: int, backward: bool = True) -> float:
        ids = torch.randint(VOCAB, (micro, tokens), device=device)
        sync()
        start = time.perf_counter()
        with torch.set_grad_enabled(backward), autocast(device, dtype):
            loss, _ = causal_lm_loss(cut, {"input_ids": ids, "labels": ids}, cfg.loss_chunk)
        if backward:
            loss.backward()
        sync()
        return time.perf_counter() - start

    with training_setup(cut, run, device, dtype, micro):
        one_pass(min(cfg.seq_len, 32))  # kernels built and loaded, the cache filled
        trained = best_of(lambda: one_pass(cfg.seq_len))
        forward = best_of(lambda: one_pass(cfg.seq_len, backward=False)) if lowest else 0.0
        # What the pass spends outside the layer, timed with the layer taken out: a model's
        # pass spends it once, not once a layer (the default model's step was 1.24x over).
        outside = outside_forward = 0.0
        stack = layer_stack(cut)
        if stack is not None:  # else the layer's time keeps it, as before
            with _without_layers(cut, stack):
                outside = best_of(lambda: one_pass(cfg.seq_len))
                outside_forward = best_of(lambda: one_pass(cfg.seq_len, False)) if lowest else 0.0
    needs_grad.remove()
    layers = model.config.get_text_config().num_hidden_layers
    return LayerTime(
        max(trained - outside, 0.0),
        max(forward - outside_forward, 0.0),
        layers - lowest,
        min(outside, trained),
    )


@contextmanager
def _without_layers(cut: nn.Module, stack: str) -> Iterator[None]:
    """`cut` with its decoder layers (the ModuleList named `stack`) taken out for the block."""
    parent, _, name = stack.rpartition(".")
    holder = cut.get_submodule(parent)
    stack = getattr(holder, name)
    setattr(holder, name, nn.ModuleList())
    try:
        yield
    finally:
        setattr(holder, name, stack)
