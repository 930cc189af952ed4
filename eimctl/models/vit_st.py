"""The LLaMA-Adapter family's semantic-space transformation (ST): CLIP features -> K visual tokens.

Two forms (config `model.llama_adapter.visual_fusion`):

- `tokens` (the released multimodal LLaMA-Adapter, the form the EIM paper describes as a "Transformer
  structure" ST over the full visual token set):

      features [B, T, d] --clip_proj: Linear(d -> w) + LayerNorm--> [B, T, w]
      [K learnable visual queries ; those T tokens] --depth pre-norm ViT blocks--> first K outputs
      --visual_proj: Linear(w -> D) + LayerNorm(D)--> [B, K, D]

  The ViT blocks are the standard ones (LayerNorm -> multi-head self-attention with a qkv bias -> residual;
  LayerNorm -> MLP with ratio 4 and GELU -> residual); the queries are an Embedding, so N(0, 1).

- `global_mlp` (the v1 paper's ScienceQA model, whose code was never released): a global image feature
  goes through "simple MLPs" to ONE token that is repeated K times. The paper concatenates the [CLS]
  features of several ViT layers; here the global feature is the [CLS] token of the features eimctl
  already has (CLIP's last layer, after ln_post), so M = 1: [B, T, d] -> [CLS] [B, d] ->
  Linear(d -> w) -> GELU -> Linear(w -> D) -> [B, 1, D] repeated to [B, K, D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VitBlock(nn.Module):
    """A pre-norm ViT block: x + attn(LN(x)), then x + mlp(LN(x)); qkv with bias, MLP ratio 4, GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.mlp(self.norm2(x))


class TokenST(nn.Module):
    """`visual_fusion: tokens`: learnable queries read the CLIP tokens through ViT blocks."""

    def __init__(self, feature_dim: int, width: int, lm_dim: int, queries: int, depth: int, heads: int):
        super().__init__()
        self.clip_proj = nn.Linear(feature_dim, width)
        self.clip_proj_norm = nn.LayerNorm(width)
        self.visual_query = nn.Embedding(queries, width)
        self.blocks = nn.ModuleList(VitBlock(width, heads) for _ in range(depth))
        self.visual_proj = nn.Linear(width, lm_dim)
        self.visual_proj_norm = nn.LayerNorm(lm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.clip_proj_norm(self.clip_proj(features.to(self.clip_proj.weight.dtype)))
        queries = self.visual_query.weight.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = torch.cat([queries, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, :queries.shape[1]]))


class GlobalMlpST(nn.Module):
    """`visual_fusion: global_mlp`: the [CLS] feature through an MLP, one token repeated K times."""

    def __init__(self, feature_dim: int, width: int, lm_dim: int, repeats: int):
        super().__init__()
        self.repeats = repeats
        self.mlp = nn.Sequential(nn.Linear(feature_dim, width), nn.GELU(), nn.Linear(width, lm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        token = self.mlp(features[:, :1].to(self.mlp[0].weight.dtype))
        return token.expand(-1, self.repeats, -1)


def build_st(fusion: str, *, feature_dim: int, width: int, lm_dim: int, queries: int, depth: int,
             heads: int) -> nn.Module:
    """The ST for `visual_fusion` (`tokens` or `global_mlp`); arguments already validated."""
    if fusion == "global_mlp":
        return GlobalMlpST(feature_dim, width, lm_dim, queries)
    return TokenST(feature_dim, width, lm_dim, queries, depth, heads)
