"""LaVIN's mixture-of-modality adapter (MMA): a residual bottleneck with two routed up-projections.

For an input x [B, N, d] (the output of a norm layer), hidden width h, groups g, scale s, temperature t:

    z   = dropout(A(x))                          A: Linear d -> h (Xavier weight, zero bias), shared
    w   = softmax(router(x_route) / t)           router: Linear d -> 2, on the routing token
    out = x + s * w0 * B(z) + s * w1 * D(z)      B, D: grouped Linear h -> d (g groups), ZERO weight and bias

With B and D zero, `out == x` exactly at initialisation, and only B and D receive a gradient there
(A and the router sit behind them). Parameters per adapter: (d·h + h) + 2·(d·h/g + d) + (2d + 2),
i.e. 20d + 10 at h = 8, g = 2.

Routing token: `route="token"` routes each sample on its own position 0 (the modality token in the LM,
the [CLS] in a batch-first ViT); `route="first_sample"` reproduces the original sequence-first CLIP
quirk, where sample 0's tokens route every sample position by position. Routing weights can be kept
per sample (`capture` stores the next ones computed, `cached` is then reused until cleared, and
`reindex(rows)` follows finished rows leaving a decoding batch).

Dropout runs only in a pass that can train (training mode with gradients on): encoding the frozen-CLIP
feature cache and decoding happen without gradients and so are deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTES = ("token", "first_sample")


class GroupedLinear(nn.Module):
    """A 1x1 grouped convolution as a linear map: input group k (of `groups`) feeds output group k only."""

    def __init__(self, inputs: int, outputs: int, groups: int):
        super().__init__()
        if inputs % groups or outputs % groups:
            raise ValueError(f"{inputs} -> {outputs} does not split into {groups} groups")
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(outputs, inputs // groups))
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, z: Tensor) -> Tensor:
        weight = self.weight.view(self.groups, -1, self.weight.shape[1])  # [g, out/g, in/g]
        out = torch.einsum("...gi,goi->...go", z.unflatten(-1, (self.groups, -1)), weight)
        return out.flatten(-2) + self.bias


class MixtureOfModalityAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0, temperature: float = 10.0,
                 dropout: float = 0.1, route: str = "token"):
        super().__init__()
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.down = nn.Linear(dim, hidden)                 # A
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.up_b = GroupedLinear(hidden, dim, groups)     # B (zero)
        self.up_d = GroupedLinear(hidden, dim, groups)     # D (zero)
        self.router = nn.Linear(dim, 2)
        self.scale, self.temperature, self.dropout, self.route = scale, temperature, dropout, route
        self.capture = False
        self.cached: Tensor | None = None

    def routing_weights(self, x: Tensor) -> Tensor:
        """[B, 2] (or [N, 2] for route=first_sample): the cached ones unless capturing or none are kept."""
        if self.cached is not None and not self.capture:
            return self.cached
        token = x[0] if self.route == "first_sample" else x[:, 0]
        weights = torch.softmax(self.router(token.to(self.router.weight.dtype)) / self.temperature, dim=-1)
        if self.capture:
            self.cached = weights
        return weights

    def reindex(self, rows: Tensor) -> None:
        """Keep the cached routing weights of `rows` only (finished rows left a decoding batch)."""
        if self.cached is not None:
            self.cached = self.cached[rows.to(self.cached.device)]

    def clear(self) -> None:
        self.capture, self.cached = False, None

    def forward(self, x: Tensor) -> Tensor:
        weights = self.routing_weights(x)
        if self.route == "first_sample":   # per position, shared by every sample: [1, N, 1, 2]
            weights = weights.view(1, weights.shape[0], *([1] * (x.dim() - 2)), 2)
        else:                              # per sample: [B, 1, ..., 1, 2]
            weights = weights.view(weights.shape[0], *([1] * (x.dim() - 1)), 2)
        z = self.down(x.to(self.down.weight.dtype))
        if self.dropout and self.training and torch.is_grad_enabled():
            z = F.dropout(z, self.dropout, training=True)
        delta = weights[..., 0] * self.up_b(z) + weights[..., 1] * self.up_d(z)
        return x + (self.scale * delta).to(x.dtype)


def adapter_parameters(dim: int, hidden: int = 8, groups: int = 2) -> int:
    """The parameter count of one adapter, by the formula (20d + 10 at h = 8, g = 2)."""
    return (dim * hidden + hidden) + 2 * (dim * hidden // groups + dim) + (2 * dim + 2)
