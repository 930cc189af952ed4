"""LLaMA-Adapter's adaption prompts with zero-init gated attention, attached to a Hugging Face LLaMA-
architecture causal LM (`LlamaForCausalLM` and friends) by forward hooks; the LM's own weights never change.

For each of the top L of the N decoder layers (LLaMA-Adapter v1 adapts `layers[-L:]`, L = 30 of 32 for
LLaMA-7B, K = 10 prompts):

    P_l      = prompts[l] (+ visual [B, K, D] for samples with an image)         one (L, K, D) parameter
    k_p, v_p = k_proj(P_l), v_proj(P_l)   the layer's frozen projections, on the RAW vectors: no RMSNorm,
                                          no RoPE; grouped-query attention repeats their heads as the LM does
    q        = RoPE(q_proj(h))            the layer's own queries, rotated as usual
    term     = tanh(g_l) * softmax(q k_p^T / sqrt(d_head)) v_p                   a softmax over the K prompts
    output   = attention(h) + o_proj.weight @ term                              (no second bias)

`g_l` is one gate per head per adapted layer, zero at initialisation, so the model starts as exactly the
frozen LM; tanh is applied in training and in generation alike (the original's training code uses tanh, its
released inference code does not). The separate term equals the original's concatenated form, which takes
two softmaxes over [prompt scores ; token scores] and gates the prompt part. Prompts need no causal mask:
every query sees all K of them. LLaMA-style LMs that normalise queries and keys per head inside attention
(`q_norm`/`k_norm`, e.g. Qwen3) get those norms on q and k_p too, as their attention applies them.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from eimctl.runtime.errors import EimError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_modules(lm, lm_name: str) -> list[nn.Module]:
    """The `self_attn` module of every decoder layer of a LLaMA-architecture `*ForCausalLM`."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    attentions = [getattr(layer, "self_attn", None) for layer in layers] if layers is not None else []
    if not attentions or not all(all(hasattr(a, p) for p in PROJECTIONS) for a in attentions):
        raise EimError(f"'{lm_name}' is not a LLaMA-architecture causal LM (decoder layers with self_attn "
                       f"q_proj/k_proj/v_proj/o_proj)", where="model.lm.name",
                       hint="the llama-adapter family needs a LLaMA-style LM (LLaMA, SmolLM2, Mistral, ...)")
    return attentions


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotary embedding of x [B, H, S, d] with cos/sin [B, S, d] (halves rotated, as in transformers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class AdaptionPrompts(nn.Module):
    """`prompts` (L, K, D) ~ N(0, init_std²) and `gates` (L, H) = 0, hooked into the LM's top L layers."""

    def __init__(self, lm, *, layers: int, prompt_len: int, init_std: float = 1.0, lm_name: str = "the LM"):
        super().__init__()
        attentions = attention_modules(lm, lm_name)
        if not 1 <= layers <= len(attentions):
            raise EimError(f"model.llama_adapter.layers={layers}, but '{lm_name}' has {len(attentions)} layers",
                           where="model.llama_adapter.layers", hint=f"pick 1..{len(attentions)}")
        config = lm.config
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.scaling = self.head_dim ** -0.5
        weight = lm.get_input_embeddings().weight
        dim = weight.shape[1]
        self.prompts = nn.Parameter(torch.randn(layers, prompt_len, dim, device=weight.device) * init_std)
        self.gates = nn.Parameter(torch.zeros(layers, self.heads, device=weight.device))
        self.enabled = True
        self.visual: torch.Tensor | None = None   # [B, K, D] per-sample visual prompts, or None
        self._cache: dict | None = None           # layer -> (k_p, v_p) while generating
        self._queries: dict[int, torch.Tensor] = {}
        for index, attention in enumerate(attentions[len(attentions) - layers:]):
            attention.q_proj.register_forward_hook(self._query_hook(index))
            attention.register_forward_hook(self._attention_hook(index), with_kwargs=True)

    @contextmanager
    def active(self, visual: torch.Tensor | None, *, cache: bool = False):
        """Within the block the LM runs with the prompts (+ `visual`, [B, K, D], zero rows for text-only
        samples); `cache` keeps each layer's prompt keys/values (generation, where they do not change)."""
        if visual is not None and visual.shape[1:] != self.prompts.shape[1:]:
            raise EimError(f"visual tokens of shape {tuple(visual.shape[1:])} cannot be added to prompts of "
                           f"shape {tuple(self.prompts.shape[1:])}", where="model.llama_adapter",
                           hint="the ST must give prompt_len tokens of the LM's width")
        previous = (self.enabled, self.visual, self._cache)
        self.enabled, self.visual, self._cache = True, visual, {} if cache else None
        try:
            yield self
        finally:
            self.enabled, self.visual, self._cache = previous
            self._queries.clear()

    @contextmanager
    def bypassed(self):
        """Within the block the hooks do nothing: the plain frozen LM."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` of the per-row state (generation drops finished rows)."""
        if self.visual is None:
            return
        self.visual = self.visual[rows]
        if self._cache:
            self._cache = {index: (k[rows], v[rows]) for index, (k, v) in self._cache.items()}

    def _query_hook(self, index: int):
        def hook(module, args, output):
            if self.enabled:
                self._queries[index] = output
        return hook

    def _attention_hook(self, index: int):
        def hook(module, args, kwargs, output):
            if not self.enabled:
                return None
            queries = self._queries.pop(index)
            embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            if embeddings is None:
                raise EimError("this transformers version passes no rotary position embeddings to attention",
                               where="model.lm.name", hint="upgrade transformers (>= 4.48)")
            cos, sin = embeddings
            term = self.prompt_term(index, module, queries, cos, sin)
            return (output[0] + term.to(output[0].dtype), *output[1:])
        return hook

    def layer_prompts(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        """P_l: [1, K, D] without visual tokens, else [B, K, D]."""
        prompts = self.prompts[index].unsqueeze(0)
        if self.visual is not None:
            prompts = prompts + self.visual.to(prompts.dtype)
        return prompts.to(dtype)

    def prompt_kv(self, index: int, attention, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' keys and values [b, H, K, d_head], KV heads repeated to the query heads."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        prompts = self.layer_prompts(index, dtype)
        rows, length = prompts.shape[:2]
        keys = attention.k_proj(prompts).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        values = attention.v_proj(prompts).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if getattr(attention, "k_norm", None) is not None:   # LLaMA-style LMs that normalise q and k per head
            keys = attention.k_norm(keys.transpose(1, 2)).transpose(1, 2)
        groups = self.heads // self.kv_heads
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        if self._cache is not None:
            self._cache[index] = (keys, values)
        return keys, values

    def prompt_term(self, index: int, attention, queries: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
        """o_proj.weight @ (tanh(g_l) * softmax(q k_p^T / sqrt(d)) v_p): [B, S, D] from q_proj's output."""
        batch, length = queries.shape[:2]
        q = queries.view(batch, length, self.heads, self.head_dim)
        if getattr(attention, "q_norm", None) is not None:
            q = attention.q_norm(q)
        q = rotate(q.transpose(1, 2), cos.to(q.dtype), sin.to(q.dtype))
        keys, values = self.prompt_kv(index, attention, q.dtype)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * getattr(attention, "scaling", self.scaling)
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        gate = torch.tanh(self.gates[index]).to(q.dtype).view(1, self.heads, 1, 1)
        term = gate * torch.matmul(weights, values)
        return F.linear(term.transpose(1, 2).reshape(batch, length, -1), attention.o_proj.weight)
