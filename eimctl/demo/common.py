"""What the demo's two pretrainings share: the data's identity, the finished
marker, the staging-folder build, the AdamW grouping, the warm-up cosine
schedule and a small step/time-cap trainer.

Each model folder is built in a temporary sibling and renamed into place; its
`pretrain.json` (parameters and metrics, written last) lets a rerun with the
same parameters skip the work.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from eimctl.data.demo import ensure_replaceable, publish_dir
from eimctl.runtime.atomic import write_json
from eimctl.runtime.errors import EimError
from eimctl.train.loop import train_step

Log = Callable[[str], None]
MARKER = "pretrain.json"


def data_parameters(data_dir: Path) -> dict:
    """The generator's parameters, which identify the data: a changed dataset invalidates a cached model."""
    marker = data_dir / "demo.json"
    if not marker.is_file():
        raise EimError(f"no demo dataset in {data_dir} (missing demo.json)",
                       hint="generate it first with eimctl.data.demo.generate_demo_data")
    return json.loads(marker.read_text(encoding="utf-8"))["parameters"]


def is_finished(model_dir: Path, parameters: dict) -> bool:
    marker = model_dir / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text(encoding="utf-8")).get("parameters") == parameters


def build_in_staging(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build(staging)` in a temporary sibling of `target`, then publish it as `target`."""
    ensure_replaceable(target, MARKER)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(staging)
        publish_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def pretrain_once(name: str, target: Path, parameters: dict, build: Callable[[Path], None], log: Log) -> Path:
    """`target`, built by `build` unless a finished build with the same parameters is already there."""
    if is_finished(target, parameters):
        log(f"{name}: already pretrained in {target}")
        return target
    build_in_staging(target, build)
    return target


def write_marker(staging: Path, parameters: dict, metrics: dict) -> None:
    """The finished marker, written last."""
    write_json(staging / MARKER, {"parameters": parameters, "metrics": metrics})


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    # No decay on gains, biases, embeddings and the logit scale (as open_clip
    # and GPT-2 training do): decaying them only hurts a short run.
    decayed, kept = [], []
    for name, parameter in model.named_parameters():
        no_decay = parameter.ndim < 2 or "embedding" in name or "wte" in name or "wpe" in name
        (kept if no_decay else decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate)


class StepTrainer:
    """AdamW with a warm-up cosine schedule, a step counter, a time cap and one log line per interval.

    `parameters` are the run's recorded parameters; it uses their seed (data
    order), epochs, learning_rate, weight_decay and max_seconds."""

    def __init__(self, name: str, model: torch.nn.Module, steps_per_epoch: int, parameters: dict,
                 metrics_path: Path, log: Log, log_every: int):
        self.name, self.model, self.parameters, self.metrics_path = name, model, parameters, metrics_path
        self.total_steps, self.max_seconds = parameters["epochs"] * steps_per_epoch, parameters["max_seconds"]
        self.log, self.log_every = log, log_every
        self.optimizer = adamw(model, parameters["learning_rate"], parameters["weight_decay"])
        total_steps, warmup_steps = self.total_steps, max(1, self.total_steps // 10)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps))
        self.step, self.start, self.last_loss, self.stopped_early = 0, time.monotonic(), float("nan"), False

    def out_of_time(self) -> bool:
        if self.max_seconds is not None and time.monotonic() - self.start > self.max_seconds:
            if not self.stopped_early:
                self.log(f"{self.name}: time cap of {self.max_seconds:.0f}s reached at step {self.step}")
            self.stopped_early = True
        return self.stopped_early

    def run(self, epoch_batches: Callable[[torch.Generator], Iterable], step: Callable[[Any], None]) -> None:
        """`step(batch)` for each batch of `epoch_batches(order_generator)`, once per epoch, until the time
        cap; `order_generator` is seeded once with the run's seed and drawn on across epochs."""
        order_generator = torch.Generator().manual_seed(self.parameters["seed"])
        self.model.train()
        for _epoch in range(self.parameters["epochs"]):
            for batch in epoch_batches(order_generator):
                if self.out_of_time():
                    break
                step(batch)

    def apply(self, loss: torch.Tensor) -> None:
        """One optimizer step on `loss` at the schedule's learning rate."""
        lr = self.scheduler.get_last_lr()[0]
        values = train_step({"loss": loss}, {}, self.optimizer, self.scheduler, [], 0.0, self.step + 1,
                            f"demo {self.name} pretraining")
        self.step += 1
        self.last_loss = values["loss"]
        if self.step % self.log_every == 0 or self.step == self.total_steps:
            elapsed = time.monotonic() - self.start
            self.log(f"{self.name} step {self.step}/{self.total_steps} loss {self.last_loss:.4f} "
                     f"lr {lr:.2e} elapsed {elapsed:.1f}s")
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.step, "loss": self.last_loss, "lr": lr,
                                         "elapsed_s": round(elapsed, 2)}) + "\n")

    def summary(self, train_seconds: float) -> dict:
        return {"steps": self.step, "final_loss": self.last_loss, "stopped_early": self.stopped_early,
                "train_seconds": round(train_seconds, 1)}


def train_causal_lm(name: str, model, token_ids: list[list[int]], make_batch: Callable, parameters: dict,
                    staging: Path, log: Log, log_every: int) -> "StepTrainer":
    """Language-model pretraining of a demo LM: shuffled batches of `token_ids` through `make_batch(rows) ->
    (input_ids, attention_mask, labels)`, the model's own loss, StepTrainer's optimiser and metrics."""
    batch_size = parameters["batch_size"]
    steps_per_epoch = max(1, math.ceil(len(token_ids) / batch_size))
    trainer = StepTrainer(name, model, steps_per_epoch, parameters, staging / "metrics.jsonl", log, log_every)

    def epoch_batches(order_generator: torch.Generator):
        order = torch.randperm(len(token_ids), generator=order_generator).tolist()
        for start in range(0, len(order), batch_size):
            yield make_batch([token_ids[i] for i in order[start:start + batch_size]])

    def step(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        input_ids, attention_mask, labels = batch
        trainer.apply(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)

    trainer.run(epoch_batches, step)
    return trainer
