"""`eimctl train-stage STAGE`: train one stage of the schedule into RUN_DIR/stages/STAGE.

    eimctl train-stage st --run-dir runs/demo/eim --config examples/demo-eim.yaml

A stage (eimctl/eim/schedule.py) starts from its `init` (the pretrained models, or
another stage's final weights, which must be complete and from the same config),
trains only its own groups with its own losses, and saves every tensor trained so
far in `final/trainable.safetensors`. The recipe reads top to bottom: setup (data,
model, queues, batches) -> fit (eimctl/train/loop.py) -> save (weights, manifest).
"""
from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import torch

from eimctl.config import Config, config_fingerprint, dump_yaml, fingerprint, to_dict, with_overrides
from eimctl.eim.clip_tuning_drift import check_clip_tuning
from eimctl.eim.diagnostics import StageDiagnostics, summary_line
from eimctl.eim.objectives import compute_losses
from eimctl.eim.queues import centred_queues, check_queue_widths, place_queues, queue_folder, require_queues
from eimctl.eim.related import related_rows
from eimctl.eim.schedule import resolve_schedule, schedule_uses, stage_spec
from eimctl.data.tokens import tokenize_for_training
from eimctl.evaluate.diagnostic_figures import DIAGNOSTICS_FILE
from eimctl.models.factory import build_model, learning_rates_by_prefix, set_trainable
from eimctl.runtime.atomic import write_json, write_text
from eimctl.runtime.device import resolve_device
from eimctl.runtime.distributed import (barrier, check_same_everywhere, check_shared, check_strategy, current,
                                        device_for, distributed_record, finish, is_writer, leave, start,
                                        writer_first)
from eimctl.runtime.interrupts import Interrupted
from eimctl.runtime.jsonl import read_jsonl
from eimctl.runtime.locks import clear_keeping_lock, hold_lock
from eimctl.runtime.progress import log
from eimctl.runtime.rundir import require_upstream, skip_or_run, stage_dir, write_manifest
from eimctl.runtime.weights import WEIGHTS, save_weights
from eimctl.tasks import formatter, get_task
from eimctl.train.batches import image_inputs, make_collate
from eimctl.train.fsdp import full_tensors
from eimctl.train.loop import fit
from eimctl.train.sharding import check_micro_batch


class StageRecipe:
    """One stage: setup -> fit -> save. `config` is the run's (shared by its stages and fingerprinted);
    `stage_config` is the same with the stage's own `train:` overrides applied (what this stage runs with)."""

    def __init__(self, config: Config, run_dir: Path, stage: str, *, show: bool = True,
                 config_args: str = " <same config>"):
        self.config, self.run_dir, self.show = config, Path(run_dir), show
        self.config_args = config_args  # the command line's --config files and overrides, for suggested commands
        self.schedule = resolve_schedule(config)
        self.spec = stage_spec(self.schedule, stage)
        self.stage_config = with_overrides(config, {"train": self.spec.train}, f"stages.{stage}.train")
        self.train = self.stage_config.train
        self.config_fp = config_fingerprint(config)
        self.out = stage_dir(run_dir, stage)
        self.started = time.time()

    def init_weights(self) -> Path | None:
        """The final weights of the stage this one starts from (checked complete and same-config)."""
        if self.spec.init == "pretrained":
            return None
        init_dir = stage_dir(self.run_dir, self.spec.init)
        require_upstream(init_dir, f"stage '{self.spec.init}' (which '{self.spec.name}' starts from)",
                         f"eimctl train-stage {self.spec.init} --run-dir {self.run_dir}{self.config_args}",
                         {"config": self.config_fp})
        return init_dir / "final" / WEIGHTS

    def setup(self) -> None:
        config, spec = self.config, self.spec
        init_weights = self.init_weights()
        task = get_task(config.data.task)
        self.data = task.read(config.data, "train")
        with writer_first():  # a queue's memory-mapped sidecar is built once, by rank 0
            queues = require_queues(config, self.data, spec.queues, self.config_args) if spec.queues else {}
        if config.eim.center_keys:
            queues = centred_queues(queues, self.show)
        self.related = related_rows(self.data.samples, config.eim)  # None: the paper's InfoNCE
        self.device = device_for(resolve_device(self.train.device))
        torch.manual_seed(self.train.seed)  # the same initialisation on every rank
        groups, losses = schedule_uses(self.schedule)
        self.model, self.inherited = build_model(config, groups=groups, losses=losses,
                                                 trained_now=set(spec.trainable), weights=init_weights)
        set_trainable(self.model, config.model.family, spec.trainable)
        if current().distributed:  # dropout differs per rank (as open_clip seeds it)
            torch.manual_seed(self.train.seed + current().rank)
        check_queue_widths(self.model, queues, queue_folder(config, self.data))
        self.queues = place_queues(queues, config.eim.queue_placement, self.device, config.eim.device_queue_dtype,
                                   self.show)
        if self.train.grad_checkpointing and hasattr(self.model, "enable_gradient_checkpointing"):
            self.model.enable_gradient_checkpointing()
        if self.train.compile:
            self.model.compile_for_training()
        tokens = tokenize_for_training(self.model.tokenizer, list(map(formatter(task, config), self.data.samples)),
                                       config.data, f"{config.data.path} (train)", self.show)
        first = 0 if getattr(self.model, "scores_first_text_token", True) else 1
        self.token_counts = [len(t.ids) - max(t.response_start, first) for t in tokens]  # what loss_base averages
        with writer_first():  # the feature cache is built by rank 0 while the others wait
            images_for = image_inputs(self.model, self.stage_config, self.data,
                                      self.run_dir / "cache", self.device, self.show)
        self.collate = make_collate(tokens, self.model.tokenizer.pad_token_id, images_for)
        self.diagnostics = None if not (config.eval.diagnostics and is_writer()) else StageDiagnostics(
            self.model, self.stage_config, task, spec.losses, self.run_dir / "cache",
            self.device)

    def fit(self, resume: str) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if is_writer():
            write_text(self.out / "config.yaml", dump_yaml(self.stage_config))
        model, spec, eim = self.model, self.spec, self.config.eim

        def losses(batch: dict) -> dict:
            return compute_losses(model, batch, spec.losses, self.queues, eim, related=self.related)

        def clip_tuning(when: str) -> dict | None:  # drift of the CLIP tuning module, if this stage trains it
            if not is_writer():
                return None
            return check_clip_tuning(model, self.config, self.data, self.queues, self.device, when, self.show)

        before = clip_tuning("before")
        summary = fit(stage=spec.name, model=model, losses=losses, collate=self.collate,
                      dataset_size=len(self.data.samples), cfg=self.train, out_dir=self.out,
                      config_fp=self.config_fp, device=self.device, resume=resume, show=self.show,
                      weights={f"loss_{k}": v for k, v in spec.losses.items()},
                      lr_by_prefix=learning_rates_by_prefix(self.config, spec.trainable),
                      token_counts=self.token_counts, dist=self.config.dist)
        self.clip_tuning = {"clip_tuning": {"before": before, "after": clip_tuning("after")}} if before else {}
        return summary

    def diagnose(self) -> list[str]:
        """diagnostics.json of the trained model (eimctl/eim/diagnostics.py; after its weights are saved)."""
        if self.diagnostics is None:
            return []
        record = self.diagnostics.after_training(self.data, self.collate, self.queues)
        write_json(self.out / DIAGNOSTICS_FILE, record)
        log(f"{summary_line(record)} -> {self.out / DIAGNOSTICS_FILE}", self.show)
        return [DIAGNOSTICS_FILE]

    def save(self, summary: dict) -> Path:
        """Rank 0 writes the final weights (whole tensors, gathered by every rank under FSDP) and the manifest;
        every rank returns the folder."""
        config, spec, out = self.config, self.spec, self.out
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad} | self.inherited
        tensors = full_tensors(self.model, trained)
        if not is_writer():
            return out
        (out / "final").mkdir(exist_ok=True)
        save_weights(out / "final" / WEIGHTS, tensors, {"stage": spec.name, "config": self.config_fp})
        diagnosed = self.diagnose()
        write_manifest(out, step="train-stage", config=to_dict(config), started=self.started,
                       fingerprints={"config": self.config_fp, "model": fingerprint(to_dict(config.model)),
                                     "data": self.data.fingerprint},
                       outputs=["config.yaml", "metrics.jsonl", f"final/{WEIGHTS}", *diagnosed],
                       extra={"stage": spec.name, "init": spec.init, "trainable": list(spec.trainable),
                              "losses": spec.losses, "summary": summary, "device": str(self.device),
                              "distributed": distributed_record(self.config, self.train),
                              **self.clip_tuning})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # final/ holds the result now
        log(f"stage '{spec.name}' complete: {summary['steps']} steps, {final_losses_text(out / 'metrics.jsonl')} "
            f"-> {out}", self.show)
        return out


def final_losses_text(metrics_path: Path) -> str:
    """The last logged interval's losses, as `eimctl report` shows them: "final loss 0.6903 (mean of the
    last log interval)", with each loss named when the stage has several ("= loss_base 0.71 + loss_ie 2.44")."""
    records, _ = read_jsonl(metrics_path, tolerant=True)
    if not records or "loss" not in records[-1]:
        return "no loss logged"
    last = records[-1]
    parts = [f"{name} {value:.4f}" for name, value in last.items() if name.startswith("loss_")]
    named = f" = {' + '.join(parts)}" if len(parts) > 1 else ""
    return f"final loss {last['loss']:.4f}{named} (mean of the last log interval)"


def train_stage(config: Config, run_dir: Path, stage: str, *, force: bool = False, resume: str = "auto",
                show: bool = True, config_args: str = " <same config>") -> Path:
    """Train `stage` unless it is already complete with this config; returns its folder. `config_args`
    (e.g. " --config a.yaml train.lr=1e-4") makes the commands that errors suggest runnable as printed."""
    start(config.dist, device_for(resolve_device(config.train.device)))
    try:
        out = _train_stage(config, run_dir, stage, force=force, resume=resume, show=show and is_writer(),
                           config_args=config_args)
    except BaseException:
        leave()  # no barrier: a rank that failed alone would wait there for ever; torchrun stops the others
        raise
    finish()
    return out


def _train_stage(config: Config, run_dir: Path, stage: str, *, force: bool, resume: str, show: bool,
                 config_args: str) -> Path:
    check_strategy(config.dist)  # before anything is written
    recipe = StageRecipe(config, run_dir, stage, show=show, config_args=config_args)
    check_same_everywhere(recipe.config_fp, "the config fingerprint")
    check_shared(run_dir, "the run directory")
    check_micro_batch(recipe.train.batch_size, current(), recipe.train.micro_batch_size)
    if skip_or_run(recipe.out, f"stage '{stage}'", {"config": recipe.config_fp}, force=force,
                   on_mismatch="refuse") == "skip":
        log(f"stage '{stage}' is already complete in {recipe.out} (same config) — skipping; --force retrains it",
            show)
        return recipe.out
    with hold_lock(recipe.out, f"stage '{stage}' in {run_dir}"):  # a second launch of this stage is refused
        recipe.setup()
        if force and recipe.out.exists() and is_writer():
            clear_keeping_lock(recipe.out)
        barrier()
        return _fit_and_save(recipe, stage, run_dir, resume)


def _fit_and_save(recipe: StageRecipe, stage: str, run_dir: Path, resume: str) -> Path:
    if recipe.diagnostics is not None:
        recipe.diagnostics.before_training()  # the lm stage's text-only NLL of the weights it starts from
    try:
        summary = recipe.fit(resume)
    except Interrupted as stop:  # checkpoint saved: say how to continue, runnable as printed
        resume_with = (f"eimctl train-stage {shlex.quote(stage)} --run-dir {shlex.quote(str(run_dir))}"
                       f"{recipe.config_args}")
        raise Interrupted(stop.signal_number, stop.step, stop.total, stop.checkpoint, resume_with) from None
    return recipe.save(summary)
