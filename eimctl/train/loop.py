"""The training loop shared by every stage: resumable, checkpointed, logged.

A stage supplies the model, which parameters train, a `collate(indices)` that
builds a batch from sample indices, and `losses(batch)` returning named losses
(their sum is optimised). The loop owns data order, optimiser, schedule,
checkpoints, resume and metrics. Data order is a seeded permutation per epoch,
so resuming mid-epoch continues with exactly the batches that were next.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from eimctl.runtime import faults
from eimctl.runtime.distributed import (DistConfig, World, barrier, broadcast_object, current, gather_objects,
                                        is_writer)
from eimctl.runtime.atomic import write_text
from eimctl.runtime.errors import EimError
from eimctl.runtime.interrupts import Interrupted, StopSignals
from eimctl.runtime.progress import StepProgress, log
from eimctl.train.fsdp import release, restore, save_full, save_sharded, shard_model, wants_fsdp
from eimctl.train.loggers import MetricsSink
from eimctl.train.checkpoint import list_checkpoints, load_state, save_checkpoint
from eimctl.train.sharding import NoMetrics, Sharding, check_micro_batch, distributed_objective, rank_seed, \
    sharded_step, update, weighted_sum


@dataclass
class Plan:
    dataset_size: int
    batch_size: int
    epochs: int
    max_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.dataset_size / self.batch_size)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def batches_from(plan: Plan, seed: int, start_step: int):
    """Index lists for steps start_step .. total_steps-1."""
    step = start_step
    while step < plan.total_steps:
        epoch, offset = divmod(step, plan.steps_per_epoch)
        order = epoch_order(seed, epoch, plan.dataset_size)
        for k in range(offset, plan.steps_per_epoch):
            if step >= plan.total_steps:
                return
            yield order[k * plan.batch_size:(k + 1) * plan.batch_size]
            step += 1


class _Indices(Dataset):
    """DataLoader plumbing: workers receive index lists and run the stage's collate."""

    def __init__(self, collate):
        self.collate = collate

    def __len__(self):
        return 0

    def __getitem__(self, index):
        return index


def linear_warmup_decay(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def warmup_then_decay(warmup: int, total: int, shape: str = "linear"):
    """Per-step lr factor: linear warm-up over `warmup` steps, then a linear or half-cycle cosine decay to 0."""
    if shape == "linear":
        return linear_warmup_decay(warmup, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def learning_rate(cfg) -> float:
    """train.lr, or train.blr scaled by the batch size (lr = blr * batch / 256) when blr is set."""
    return cfg.blr * cfg.batch_size / 256 if cfg.blr else cfg.lr


def make_optimizer(model: nn.Module, params: list, cfg, lr_by_prefix: dict[str, float] | None = None):
    """AdamW over `params` (the trainable ones). Parameters whose names start with a key of `lr_by_prefix`
    form a group with that learning rate (the schedule scales every group alike); the rest use the stage's
    rate. With train.decay_1d off, biases and other 1-D tensors get no weight decay."""
    lr, betas = learning_rate(cfg), (0.9, cfg.adam_beta2)
    if not lr_by_prefix and cfg.decay_1d:
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=betas)
    prefixes = lr_by_prefix or {}
    members: dict = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            decays = cfg.decay_1d or (param.ndim > 1 and not name.endswith(".bias"))
            members.setdefault((prefix, decays), []).append(param)
    groups = [{"params": group, "lr": prefixes.get(prefix, lr), "weight_decay": cfg.weight_decay if decays else 0.0}
              for (prefix, decays), group in members.items()]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, betas=betas)


def train_step(named: dict, weights: dict, optimizer, scheduler, params: list, max_grad_norm: float,
               step: int, where: Path | str = "") -> dict[str, float]:
    """Backward and update from the step's named losses; returns {"loss": total, name: value}.

    The values come to the host in one copy per step (on a GPU each copy is a wait) and the total
    is checked for NaN/inf before the optimizer touches the weights."""
    total = weighted_sum(named, weights)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    values = torch.stack([total.detach(), *(v.detach() for v in named.values())]).float().tolist()
    update(values[0], optimizer, scheduler, params, max_grad_norm, step, where)
    return dict(zip(["loss", *named], values))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}  # dropout is the only randomness inside a step
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_fields(world: World) -> dict:
    """The checkpoint's RNG: one process's state (as always), or every rank's with the world size."""
    if not world.distributed:
        return {"rng": _rng_state()}
    return {"rng_ranks": gather_objects(_rng_state()), "world_size": world.size}


def _resume_rng(state: dict, world: World, seed: int, show: bool) -> None:
    """Dropout continues exactly at the same world size; at another, it is re-seeded per (seed, step, rank)."""
    saved = state.get("world_size", 1)
    if saved == world.size:
        _restore_rng(state["rng"] if saved == 1 else state["rng_ranks"][world.rank])
        return
    torch.manual_seed(rank_seed(seed, state["step"], world.rank))
    log(f"checkpoint from {saved} process(es), resuming with {world.size}: data order and learning-rate "
        "schedule continue exactly; dropout is re-seeded", show)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from a crash
    write_text(path, "".join(line + "\n" for line in kept))


def _resume(stage: str, checkpoints: Path, metrics_path: Path, model: nn.Module, optimizer, scheduler,
            config_fp: str, resume: str, show: bool, seed: int = 0) -> tuple[int, dict]:
    """(step, running log interval) to continue from: the last checkpoint's, or a fresh start. Rank 0 picks the
    checkpoint and every rank loads that one."""
    world = current()
    found = broadcast_object([p.name for p in list_checkpoints(checkpoints)] if world.rank == 0 else None)
    if found and resume == "never":
        raise EimError(f"stage '{stage}' has checkpoints from an interrupted run", where=str(checkpoints),
                       hint="pass --resume auto to continue it, or --force to start over")
    if not found:
        if is_writer():
            metrics_path.unlink(missing_ok=True)
        return 0, {"sum": {}, "count": 0}
    folder = checkpoints / found[-1]
    state = load_state(folder)
    if state.get("config_fingerprint") != config_fp:
        raise EimError(f"checkpoints of stage '{stage}' come from another config", where=str(folder),
                       hint="resume with the config they were made with, or --force to start over")
    restore(folder, state, model, optimizer)  # any format, into a plain or an FSDP-sharded model
    scheduler.load_state_dict(state["scheduler"])
    _resume_rng(state, world, seed, show)
    if is_writer():
        _truncate_metrics(metrics_path, state["step"])
    log(f"resuming stage '{stage}' from step {state['step']} ({folder.name})", show)
    return state["step"], state["interval"]


def _accumulate(interval: dict, losses: dict, step: int, plan: Plan, scheduler, metrics, started: float,
                samples_seen: int, log_every: int) -> dict:
    """Add a step's losses to the log interval; at the interval's end write its means to metrics.jsonl
    and start a new one."""
    for key, value in losses.items():
        interval["sum"][key] = interval["sum"].get(key, 0.0) + value
    interval["count"] += 1
    if step % log_every and step != plan.total_steps:
        return interval
    elapsed = time.time() - started
    record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4),
              **{k: v / interval["count"] for k, v in interval["sum"].items()},
              "lr": scheduler.get_last_lr()[0], "elapsed_s": round(elapsed, 3),
              "samples_per_s": round(samples_seen / max(elapsed, 1e-9), 2)}
    metrics.log(record)
    return {"sum": {}, "count": 0}


def fit(*, stage: str, model: nn.Module, losses: Callable[[dict], dict], collate: Callable[[list[int]], dict],
        dataset_size: int, cfg, out_dir: Path, config_fp: str, device: torch.device,
        resume: str = "auto", show: bool = True, weights: dict | None = None,
        lr_by_prefix: dict[str, float] | None = None, token_counts: list[int] | None = None,
        dist: DistConfig | None = None) -> dict:
    """Train until the plan's last step; returns a summary. Checkpoints under out_dir/checkpoints.
    `lr_by_prefix` gives parameters whose names start with a prefix their own learning rate. `token_counts`
    (scored response tokens per sample) weigh loss_base when a global batch is split over ranks or
    micro-batches (eimctl/train/sharding.py). `dist` is the config's dist section (defaults when None)."""
    world, dist = current(), dist or DistConfig()
    plan = Plan(dataset_size, cfg.batch_size, cfg.epochs, cfg.max_steps)
    check_micro_batch(cfg.batch_size, world, cfg.micro_batch_size)
    # FSDP2 replaces the parameters with sharded ones (DTensors): shard first, then build the optimiser over them
    objective = shard_model(model, losses, device, dist.fsdp_reshard_after_forward) if wants_fsdp(dist, show) \
        else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EimError(f"stage '{stage}' has nothing to train", hint="check the stage's trainable modules")
    optimizer = make_optimizer(model, params, cfg, lr_by_prefix)
    warmup = round(cfg.warmup_epochs * plan.steps_per_epoch) if cfg.warmup_epochs else cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(warmup, plan.total_steps, cfg.schedule))
    step, interval = _resume(stage, out_dir / "checkpoints", out_dir / "metrics.jsonl", model, optimizer, scheduler,
                             config_fp, resume, show, cfg.seed)
    if objective is None:
        model.to(device)
    model.train()
    run = _Run(stage, model, losses, cfg, out_dir, config_fp, device, show and is_writer(), weights or {},
               Sharding(world, token_counts or [1] * dataset_size, cfg.micro_batch_size), plan, objective,
               dist.checkpoint_format)
    summary = run.loop(collate, optimizer, scheduler, params, step, interval)
    if objective is not None:
        release(objective)  # whole tensors again, for what runs after training
    return summary


class _Run:
    """The steps of one fit: batches in, optimiser steps, logs and checkpoints out."""

    def __init__(self, stage, model, losses, cfg, out_dir, config_fp, device, show, weights, sharding, plan,
                 objective=None, checkpoint_format: str = "full"):
        self.stage, self.model, self.losses, self.cfg, self.out_dir = stage, model, losses, cfg, out_dir
        self.config_fp, self.device, self.show, self.weights = config_fp, device, show, weights
        self.sharding, self.plan, self.world = sharding, plan, current()
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self.fsdp = objective is not None  # already sharded by FSDP2 (eimctl/train/fsdp.py)
        self.checkpoint_format = checkpoint_format  # dist.checkpoint_format, under FSDP
        self.objective = objective if self.fsdp else distributed_objective(model, losses, self.world, device)

    def prepare(self, objective, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with self.autocast:
            return objective(batch)

    def loader(self, collate, step: int) -> DataLoader:
        cfg = self.cfg
        return DataLoader(_Indices(collate), batch_sampler=self.sharding.local_batches(
                              batches_from(self.plan, cfg.seed, step)), collate_fn=collate,
                          num_workers=cfg.num_workers, pin_memory=cfg.pin_memory and self.device.type == "cuda",
                          # its own generator: drawing worker seeds must not move the global RNG (dropout)
                          generator=torch.Generator().manual_seed(cfg.seed))

    def one_step(self, batches, global_indices, optimizer, scheduler, params, step, flags) -> tuple[dict, list, int]:
        """(losses, flags() after the step — agreed by every rank —, global samples) of the next step."""
        shares = self.sharding.shares(global_indices)
        if self.sharding.plain:
            named = self.prepare(self.losses, next(batches))
            values = train_step(named, self.weights, optimizer, scheduler, params, self.cfg.max_grad_norm, step,
                                self.out_dir)
            return values, flags(), len(global_indices)
        values, agreed = sharded_step(self.objective, batches, shares, self.weights, optimizer, scheduler, params,
                                      self.cfg.max_grad_norm, step, self.out_dir, self.prepare, flags)
        return values, agreed, shares[0].samples

    def loop(self, collate, optimizer, scheduler, params, step: int, interval: dict) -> dict:
        cfg, plan, checkpoints = self.cfg, self.plan, self.out_dir / "checkpoints"
        batches = iter(self.loader(collate, step))
        progress = StepProgress(f"train {self.stage}", plan.total_steps, start=step, log_every=cfg.log_every,
                                enabled=self.show)
        started, samples_seen, last_losses = time.time(), 0, {}
        saved_at = time.monotonic()  # train.checkpoint_minutes counts from here
        sink = MetricsSink(self.out_dir / "metrics.jsonl", cfg.loggers, self.out_dir) if is_writer() else NoMetrics()
        with sink as metrics, StopSignals() as stop:
            for global_indices in batches_from(plan, cfg.seed, step):
                def flags() -> list[float]:  # a signal received, checkpoint minutes elapsed
                    minutes = cfg.checkpoint_minutes and time.monotonic() - saved_at >= cfg.checkpoint_minutes * 60
                    return [float(bool(stop.signal)), float(bool(minutes))]
                last_losses, (stopping, due), samples = self.one_step(
                    batches, global_indices, optimizer, scheduler, params, step + 1, flags)
                step += 1
                samples_seen += samples
                interval = _accumulate(interval, last_losses, step, plan, scheduler, metrics, started, samples_seen,
                                       cfg.log_every)
                progress.update(step, f"loss {last_losses['loss']:.4f}")
                if step < plan.total_steps and (step % cfg.checkpoint_every == 0 or due or stopping):
                    folder = self.checkpoint(metrics, checkpoints, step, optimizer, scheduler, interval)
                    saved_at = time.monotonic()
                    if stopping:  # the last step finishes the stage instead (a checkpoint there would be final/)
                        progress.close()
                        raise Interrupted(stop.signal or signal.SIGTERM, step, plan.total_steps, str(folder))
                faults.crash_after_step(step, flush=metrics.flush)
                faults.pace()
        progress.close()
        return {"steps": step, "final_loss": last_losses.get("loss"), "samples_per_s": samples_seen / max(
            time.time() - started, 1e-9), "world_size": self.world.size}

    def checkpoint(self, metrics, checkpoints: Path, step: int, optimizer, scheduler, interval: dict) -> Path:
        """Rank 0 writes the checkpoint (full tensors; every rank's RNG state in it)."""
        metrics.flush()
        if self.fsdp:
            return self.fsdp_checkpoint(checkpoints, step, optimizer, scheduler, interval)
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 **_rng_fields(self.world), "interval": interval, "config_fingerprint": self.config_fp}
        folder = checkpoints / f"step-{step:06d}"
        if is_writer():
            folder = save_checkpoint(checkpoints, step, self.model, state, keep=self.cfg.keep_checkpoints)
        barrier()
        return folder

    def fsdp_checkpoint(self, checkpoints: Path, step: int, optimizer, scheduler, interval: dict) -> Path:
        """Under FSDP every rank takes part: whole tensors gathered for rank 0 (full), or each rank's shards
        written with torch.distributed.checkpoint (sharded)."""
        state = {"step": step, "scheduler": scheduler.state_dict(), **_rng_fields(self.world), "interval": interval,
                 "config_fingerprint": self.config_fp}
        save = save_sharded if self.checkpoint_format == "sharded" else save_full
        return save(checkpoints, step, self.model, optimizer, state, self.cfg.keep_checkpoints)
