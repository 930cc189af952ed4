"""Semantic-space transformation networks (ST): image features -> LM prefix embeddings.

    mlp          ClipCap's prefix MLP: pooled [B, 1, d] -> [B, prefix_length, D] (Tanh)
    ffn          EIM's per-token FFN: [B, T, d] -> [B, T, D] (d -> hidden -> D)
    transformer  ClipCap's mapping network: learned constant prefix attends to the image tokens
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eimctl.runtime.errors import EimError


@dataclass
class ProjectorConfig:
    type: str = "mlp"                # mlp | ffn | transformer
    prefix_length: int = 10          # mlp / transformer: number of prefix tokens produced
    hidden: int = 0                  # ffn hidden width (0 = 4 x LM width); mlp hidden (0 = LM width x prefix / 2)
    layers: int = 8                  # transformer mapping network depth
    heads: int = 8                   # transformer mapping network heads


class MLPProjector(nn.Module):
    def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, hidden: int = 0):
        super().__init__()
        self.prefix_length = prefix_length
        self.lm_dim = lm_dim
        hidden = hidden or (lm_dim * prefix_length) // 2
        self.net = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(),
                                 nn.Linear(hidden, lm_dim * prefix_length))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features[:, 0])
        return out.view(features.shape[0], self.prefix_length, self.lm_dim)


class FFNProjector(nn.Module):
    def __init__(self, clip_dim: int, lm_dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or 4 * lm_dim
        self.net = nn.Sequential(nn.Linear(clip_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class TransformerProjector(nn.Module):
    """Image tokens are mapped to the LM width; `prefix_length` learned constants read them
    through a transformer encoder, and only those constants' outputs form the prefix."""

    def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, clip_tokens: int,
                 layers: int, heads: int):
        super().__init__()
        self.prefix_length = prefix_length
        # A pooled feature is expanded into `prefix_length` tokens, as in ClipCap.
        self.expand = prefix_length if clip_tokens == 1 else 1
        self.lm_dim = lm_dim
        self.input_map = nn.Linear(clip_dim, lm_dim * self.expand)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, lm_dim))
        if lm_dim % heads:
            raise EimError(f"LM width {lm_dim} is not divisible by model.projector.heads={heads}",
                           where="model.projector.heads", hint="pick a divisor of the LM width")
        layer = nn.TransformerEncoderLayer(lm_dim, heads, dim_feedforward=2 * lm_dim, dropout=0.0,
                                           activation="relu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = features.shape
        mapped = self.input_map(features).view(batch, tokens * self.expand, self.lm_dim)
        prefix = self.prefix_const.unsqueeze(0).expand(batch, -1, -1)
        out = self.transformer(torch.cat([mapped, prefix], dim=1))
        return out[:, -self.prefix_length:]


def build_projector(cfg: ProjectorConfig, clip_dim: int, clip_tokens: int, lm_dim: int) -> nn.Module:
    if cfg.type == "mlp":
        if clip_tokens != 1:
            raise EimError("the mlp projector takes the pooled feature only", where="model.projector.type",
                           hint="set model.clip.tokens=pooled, or use model.projector.type=ffn for full tokens")
        return MLPProjector(clip_dim, lm_dim, cfg.prefix_length, cfg.hidden)
    if cfg.type == "ffn":
        return FFNProjector(clip_dim, lm_dim, cfg.hidden)
    return TransformerProjector(clip_dim, lm_dim, cfg.prefix_length, clip_tokens, cfg.layers, cfg.heads)
