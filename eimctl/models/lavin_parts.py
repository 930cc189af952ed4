"""LaVIN's trainable parts and how they attach to a frozen LLaMA-like LM (eimctl/models/lavin.py uses them).

    adapter_proj        the ST: features -> hidden_proj -> d (Linear, SiLU, Linear; Xavier weights, zero biases)
    lm_adapters         one MMA per decoder layer on input_layernorm's output: h = x + Attn(MMA(RMSNorm(x)))
    clip_adapters       one MMA per ViT block on ln_1's output (attached by ClipEncoder.attach_block_adapters)
    modality_embedding  Embedding(2, d), indexed by has_image

The LM adapters are forward hooks on each layer's `input_layernorm`, so the LM's own modules and parameter
names are untouched; a `Switch` turns them off for the plain frozen LM (`text_hidden`, the Kb keys).

The modality token (`modality_routing`): LaVIN prepends it at position 0 and masks it so that no other
token attends to it and it attends only to itself. Its hidden state in every layer is therefore exactly
that of the same token run alone as a length-1 sequence at position 0, and the rest of the sequence sees it
only through the routing weights each layer's MMA computes from it. So the modality tokens run first, alone
(each MMA captures its per-sample routing weights), then the sequence runs at positions 1.. with those
weights: the joint masked pass, computed in two pieces (and what LaVIN itself does when decoding).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from eimctl.models.lm import final_hidden
from eimctl.models.mma import MixtureOfModalityAdapter
from eimctl.runtime.errors import EimError

CLIP_ROUTES = {"cls": "token", "first_sample": "first_sample"}


class Switch:
    """A flag the LM adapter hooks read: off = the plain LM."""

    def __init__(self):
        self.on = True


def adapter_projection(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """LaVIN's AdapterMLP: Linear -> SiLU -> Linear, Xavier-uniform weights, zero biases."""
    mlp = nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, outputs))
    for layer in (mlp[0], mlp[2]):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return mlp


def lavin_modules(options, *, lm_dim: int, lm_layers: int, clip_width: int, clip_blocks: int,
                  feature_dim: int) -> nn.ModuleDict:
    """Every trainable LaVIN module at these sizes (the model's own, and what the parameter count tests)."""
    mma = partial(MixtureOfModalityAdapter, hidden=options.adapter_dim, groups=options.adapter_groups,
                  scale=options.adapter_scale, temperature=options.temperature, dropout=options.adapter_dropout)
    return nn.ModuleDict({
        "adapter_proj": adapter_projection(feature_dim, options.hidden_proj, lm_dim),
        "lm_adapters": nn.ModuleList(mma(lm_dim) for _ in range(lm_layers)),
        "clip_adapters": nn.ModuleList(mma(clip_width, route=CLIP_ROUTES[options.clip_router])
                                       for _ in range(clip_blocks)),
        "modality_embedding": nn.Embedding(2, lm_dim),
    })


def decoder_layers(lm, name: str) -> list[nn.Module]:
    """The LM's decoder layers, refused unless LLaMA-like (each with `input_layernorm` and `self_attn`)."""
    layers = getattr(getattr(lm, "base_model", None), "layers", None)
    if not layers or not all(hasattr(layer, "input_layernorm") and hasattr(layer, "self_attn") for layer in layers):
        raise EimError(f"LaVIN needs a LLaMA-like LM (decoder layers with input_layernorm and self_attn); "
                       f"'{name}' is {type(lm).__name__}", where="model.lm.name",
                       hint="use a LLaMA-architecture model (LLaMA, SmolLM2, ...)")
    return list(layers)


def attach_lm_adapters(layers: list[nn.Module], adapters: nn.ModuleList, switch: Switch) -> None:
    """adapters[i] on layers[i].input_layernorm's output while `switch.on`."""
    for layer, adapter in zip(layers, adapters, strict=True):
        layer.input_layernorm.register_forward_hook(partial(_adapted, adapter, switch))


def _adapted(adapter, switch: Switch, module, args, output):
    return adapter(output) if switch.on else output


@contextmanager
def modality_routing(lm, adapters: nn.ModuleList, modality_embedding: nn.Embedding, has_image: torch.Tensor):
    """Run each sample's modality token alone at position 0; inside the block every LM adapter routes with
    the weights it captured (per sample), whatever sequence follows. Cleared on exit."""
    for adapter in adapters:
        adapter.clear()
        adapter.capture = True
    try:
        weight = lm.get_input_embeddings().weight
        tokens = modality_embedding(has_image.long().to(weight.device))[:, None].to(weight.dtype)
        positions = torch.zeros(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        final_hidden(lm, inputs_embeds=tokens, position_ids=positions, use_cache=False)
        for adapter in adapters:
            adapter.capture = False
        yield
    finally:
        for adapter in adapters:
            adapter.clear()


def reindex_routing(adapters: nn.ModuleList, rows: torch.Tensor) -> None:
    """Follow the rows a decoding batch keeps (generate_from_embeds' on_keep)."""
    for adapter in adapters:
        adapter.reindex(rows)
