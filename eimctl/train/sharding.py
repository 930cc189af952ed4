"""One global batch over W ranks and M micro-batches, with losses that add up to one process's.

`train.batch_size` is the global batch. Each rank takes the strided share `global[rank::W]` of the
same global batch (so the data order does not depend on W), cut into micro-batches of
`train.micro_batch_size` rows. A share's losses are its own means scaled by `W * n_share / n_global`,
where n counts what the loss averages over: samples for the contrastive losses (each query's
InfoNCE depends only on it and the frozen queue), scored response tokens for loss_base. Summed over
micro-batches and averaged over ranks (DDP averages gradients), that is exactly the mean over the
global batch, with no collective to find the counts: every rank knows the global batch's indices
and every sample's token count. A rank left without samples (a last batch smaller than W) runs one
copy of the first sample with weight 0, so it still takes part in the gradient all-reduce.

With one process and no micro-batches a step is the plain one (no scaling at all): a run under
`torchrun --nproc_per_node 1` is bit for bit a plain run.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from eimctl.runtime.distributed import World, all_reduce_sum, current, shard_of
from eimctl.runtime.errors import EimError

TOKEN_LOSSES = ("loss_base",)  # averaged over scored tokens; every other loss over samples


@dataclass
class Share:
    indices: list[int]                                   # the rows this (micro-)batch runs
    scale: dict[str, float] = field(default_factory=dict)  # loss name -> factor; empty: unscaled
    samples: int = 0                                     # the global batch's size (for samples/s), on its first share


class Sharding:
    """Global batch -> this rank's micro-batches with their loss scales."""

    def __init__(self, world: World, token_counts: list[int], micro_batch: int):
        self.world, self.token_counts, self.micro = world, token_counts, micro_batch

    @property
    def plain(self) -> bool:
        return not self.world.distributed and not self.micro

    def shares(self, global_indices: list[int]) -> list[Share]:
        if self.plain:
            return [Share(global_indices, {}, len(global_indices))]
        local, pad = shard_of(global_indices, self.world)
        size = self.micro or len(local)
        pieces = [local[i:i + size] for i in range(0, len(local), size)]
        total_tokens = sum(self.token_counts[i] for i in global_indices)
        shares = []
        for piece in pieces:
            tokens = sum(self.token_counts[i] for i in piece)
            factor = 0.0 if pad else float(self.world.size)
            scale = {"samples": factor * len(piece) / len(global_indices),
                     "tokens": factor * tokens / max(total_tokens, 1)}
            shares.append(Share(piece, scale))
        shares[0].samples = len(global_indices)
        return shares

    def local_batches(self, global_batches):
        """The index lists this rank collates, in order (the DataLoader's batch sampler)."""
        for global_indices in global_batches:
            for share in self.shares(global_indices):
                yield share.indices


def check_micro_batch(batch_size: int, world: World, micro: int) -> None:
    """One line when the global batch cannot be split as asked."""
    if batch_size < world.size:
        raise EimError(f"train.batch_size={batch_size} is smaller than the {world.size} processes launched",
                       where="train.batch_size", hint="train.batch_size is the global batch: raise it, or launch "
                                                       "fewer processes")
    if micro and batch_size % (world.size * micro):
        raise EimError(f"train.batch_size={batch_size} is not a multiple of {world.size} processes x "
                       f"train.micro_batch_size={micro}", where="train.micro_batch_size",
                       hint="choose a micro-batch that divides the global batch's share of each process")


def scaled(named: dict, share: Share) -> dict:
    """The share's losses scaled to their part of the global mean (unchanged when the share is unscaled)."""
    if not share.scale:
        return named
    return {name: value * share.scale["tokens" if name in TOKEN_LOSSES else "samples"]
            for name, value in named.items()}


class Objective(nn.Module):
    """The stage's losses as one module forward, so DistributedDataParallel syncs its gradients."""

    def __init__(self, model: nn.Module, losses):
        super().__init__()
        self.model, self.losses = model, losses

    def forward(self, batch: dict) -> dict:
        return self.losses(batch)


def distributed_objective(model: nn.Module, losses, world: World, device: torch.device):
    """`losses` itself for one process; else DDP over the trainable parameters (queues are not buffers, and
    buffers are not broadcast: every rank built the same frozen model)."""
    if not world.distributed:
        return losses
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(Objective(model, losses), device_ids=ids, broadcast_buffers=False)


def no_sync_unless_last(objective, last: bool):
    """DDP's no_sync() for every micro-batch but the last (gradients all-reduced once per step); FSDP2's
    set_requires_gradient_sync(False) likewise (gradients reduce-scattered once per step)."""
    if hasattr(objective, "set_requires_gradient_sync"):
        return _fsdp_sync(objective, last)
    if last or not hasattr(objective, "no_sync"):
        return contextlib.nullcontext()
    return objective.no_sync()


@contextlib.contextmanager
def _fsdp_sync(objective, sync: bool):
    objective.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        objective.set_requires_gradient_sync(True)


def reduced(values: list[float], world: World) -> list[float]:
    """Per-rank loss values (each already scaled to its part) -> the global batch's values on every rank;
    trailing flags (stop requested, ...) come back as counts of ranks."""
    if not world.distributed:
        return values
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def rank_seed(seed: int, step: int, rank: int) -> int:
    """Dropout's seed after a resume at another world size (the saved per-rank states no longer apply)."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2 ** 63)


def weighted_sum(named: dict, weights: dict) -> torch.Tensor:
    """Σ weight·loss without a kernel for a weight of 1 or for the sum's starting 0."""
    terms = [value if weights.get(name, 1.0) == 1.0 else weights[name] * value for name, value in named.items()]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def sharded_step(objective, batches, shares: list, weights: dict, optimizer, scheduler, params: list,
                 max_grad_norm: float, step: int, where, prepare, flags) -> tuple[dict, list[float]]:
    """One optimiser step over this rank's micro-batches of a global batch (eimctl/train/sharding.py); returns
    the global batch's losses (the same on every rank) and `flags()` (read after the backward passes)
    summed over ranks, so that every rank takes the same decisions (NaN, stop, checkpoint)."""
    world = current()
    optimizer.zero_grad(set_to_none=True)
    sums, names = None, []
    for k, share in enumerate(shares):
        with no_sync_unless_last(objective, k == len(shares) - 1):
            named = scaled(prepare(objective, next(batches)), share)
            total = weighted_sum(named, weights)
            total.backward()
        part = [total.detach(), *(v.detach() for v in named.values())]
        sums, names = part if sums is None else [a + b for a, b in zip(sums, part)], list(named)
    values = reduced(torch.stack(sums).double().tolist() + flags(), world)
    losses, agreed = [v / world.size for v in values[:len(sums)]], values[len(sums):]
    update(losses[0], optimizer, scheduler, params, max_grad_norm, step, where)
    return dict(zip(["loss", *names], losses)), agreed


def update(total: float, optimizer, scheduler, params: list, max_grad_norm: float, step: int, where) -> None:
    """The optimiser step after the backward passes, unless the step's total loss is NaN/inf (then one error,
    before the weights are touched)."""
    if not math.isfinite(total):
        raise EimError(f"loss became {total} at step {step}", where=str(where),
                       hint="lower train.lr or check the data; resume from the last checkpoint")
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()


class NoMetrics:
    """The metrics sink of a rank that does not write."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def log(self, record: dict) -> None:
        return None

    def flush(self) -> None:
        return None
