"""The LLaMA-Adapter/LaVIN optimiser settings: blr scaling, half-cycle cosine, no decay on 1-D tensors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from eimctl.train.loop import learning_rate, make_optimizer, warmup_then_decay


def _cfg(**changes):
    values = dict(lr=2e-5, blr=0.0, batch_size=32, weight_decay=0.02, decay_1d=True, adam_beta2=0.999)
    values.update(changes)
    return SimpleNamespace(**values)


def test_blr_scales_with_the_batch():
    assert learning_rate(_cfg(blr=9e-3, batch_size=32)) == pytest.approx(1.125e-3)
    assert learning_rate(_cfg(blr=0.0, lr=3e-4)) == 3e-4


def test_cosine_after_warmup_hand_values():
    factor = warmup_then_decay(2, 10, "cosine")
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0)
    assert factor(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))  # = 0.5
    assert factor(10) == pytest.approx(0.0)


def test_linear_shape_is_the_old_schedule():
    factor = warmup_then_decay(2, 10, "linear")
    assert [factor(0), factor(1), factor(2), factor(6)] == [0.5, 1.0, 1.0, 0.5]


def test_no_weight_decay_on_biases_and_1d_tensors():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = make_optimizer(model, list(model.parameters()), _cfg(decay_1d=False, adam_beta2=0.95))
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decays[id(model[0].weight)] == 0.02
    assert decays[id(model[0].bias)] == 0.0 and decays[id(model[1].weight)] == 0.0
    assert all(group["betas"] == (0.9, 0.95) for group in optimizer.param_groups)


def test_default_is_one_group_with_decay_everywhere():
    model = nn.Linear(3, 3)
    optimizer = make_optimizer(model, list(model.parameters()), _cfg())
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.02
    assert isinstance(optimizer, torch.optim.AdamW)
