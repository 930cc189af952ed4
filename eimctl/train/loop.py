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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from eimctl.runtime import faults
from eimctl.runtime.atomic import write_text
from eimctl.runtime.errors import EimError
from eimctl.runtime.interrupts import Interrupted, StopSignals
from eimctl.runtime.progress import StepProgress, log
from eimctl.runtime.weights import WEIGHTS, load_weights
from eimctl.train.loggers import MetricsSink
from eimctl.train.checkpoint import list_checkpoints, load_state, save_checkpoint


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
    total = _weighted_sum(named, weights)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    values = torch.stack([total.detach(), *(v.detach() for v in named.values())]).float().tolist()
    if not math.isfinite(values[0]):
        raise EimError(f"loss became {values[0]} at step {step}", where=str(where),
                       hint="lower train.lr or check the data; resume from the last checkpoint")
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return dict(zip(["loss", *named], values))


def _weighted_sum(named: dict, weights: dict) -> torch.Tensor:
    """Σ weight·loss without a kernel for a weight of 1 or for the sum's starting 0."""
    terms = [value if weights.get(name, 1.0) == 1.0 else weights[name] * value for name, value in named.items()]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}  # dropout is the only randomness inside a step
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
            config_fp: str, resume: str, show: bool) -> tuple[int, dict]:
    """(step, running log interval) to continue from: the last checkpoint's, or a fresh start."""
    found = list_checkpoints(checkpoints)
    if found and resume == "never":
        raise EimError(f"stage '{stage}' has checkpoints from an interrupted run", where=str(checkpoints),
                       hint="pass --resume auto to continue it, or --force to start over")
    if not found:
        metrics_path.unlink(missing_ok=True)
        return 0, {"sum": {}, "count": 0}
    state = load_state(found[-1])
    if state.get("config_fingerprint") != config_fp:
        raise EimError(f"checkpoints of stage '{stage}' come from another config", where=str(found[-1]),
                       hint="resume with the config they were made with, or --force to start over")
    load_weights(model, found[-1] / WEIGHTS)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng"])
    _truncate_metrics(metrics_path, state["step"])
    log(f"resuming stage '{stage}' from step {state['step']} ({found[-1].name})", show)
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
        lr_by_prefix: dict[str, float] | None = None) -> dict:
    """Train until the plan's last step; returns a summary. Checkpoints under out_dir/checkpoints.
    `lr_by_prefix` gives parameters whose names start with a prefix their own learning rate."""
    plan = Plan(dataset_size, cfg.batch_size, cfg.epochs, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EimError(f"stage '{stage}' has nothing to train", hint="check the stage's trainable modules")
    optimizer = make_optimizer(model, params, cfg, lr_by_prefix)
    warmup = round(cfg.warmup_epochs * plan.steps_per_epoch) if cfg.warmup_epochs else cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(warmup, plan.total_steps, cfg.schedule))
    checkpoints = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    step, interval = _resume(stage, checkpoints, metrics_path, model, optimizer, scheduler, config_fp, resume, show)

    model.to(device)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    loader = DataLoader(_Indices(collate), batch_sampler=batches_from(plan, cfg.seed, step), collate_fn=collate,
                        num_workers=cfg.num_workers, pin_memory=cfg.pin_memory and device.type == "cuda",
                        # its own generator: drawing worker seeds must not move the global RNG (dropout)
                        generator=torch.Generator().manual_seed(cfg.seed))
    progress = StepProgress(f"train {stage}", plan.total_steps, start=step, log_every=cfg.log_every, enabled=show)
    started, samples_seen, last_losses = time.time(), 0, {}
    saved_at = time.monotonic()  # train.checkpoint_minutes counts from here
    with MetricsSink(metrics_path, cfg.loggers, out_dir) as metrics, StopSignals() as stop:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast:
                named = losses(batch)
            last_losses = train_step(named, weights or {}, optimizer, scheduler, params, cfg.max_grad_norm,
                                     step + 1, out_dir)
            step += 1
            samples_seen += len(batch["indices"])
            interval = _accumulate(interval, last_losses, step, plan, scheduler, metrics, started, samples_seen,
                                   cfg.log_every)
            progress.update(step, f"loss {last_losses['loss']:.4f}")
            minutes_due = cfg.checkpoint_minutes and time.monotonic() - saved_at >= cfg.checkpoint_minutes * 60
            if step < plan.total_steps and (step % cfg.checkpoint_every == 0 or minutes_due or stop.signal):
                metrics.flush()
                folder = save_checkpoint(checkpoints, step, model, {
                    "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(), "interval": interval, "config_fingerprint": config_fp},
                    keep=cfg.keep_checkpoints)
                saved_at = time.monotonic()
                if stop.signal:  # the last step finishes the stage instead (a checkpoint there would be final/)
                    progress.close()
                    raise Interrupted(stop.signal, step, plan.total_steps, str(folder))
            faults.crash_after_step(step, flush=metrics.flush)
            faults.pace()
    progress.close()
    return {"steps": step, "final_loss": last_losses.get("loss"), "samples_per_s": samples_seen / max(
        time.time() - started, 1e-9)}
