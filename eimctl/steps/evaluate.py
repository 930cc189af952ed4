"""`eimctl evaluate TASK`: score a trained stage on a task's benchmark.

    eimctl evaluate coco --run-dir runs/demo --stage base
    eimctl evaluate scienceqa --problems problems.json --results results.json --out scores/

The stage's model is rebuilt from its manifest's config and final weights; the
task (eimctl/tasks/) generates its predictions and scores them. Results go to
`<run>/eval/<stage>-<task>/` (predictions, metrics.json, manifest.json last). A task that can score
files written elsewhere (`score_file`: scienceqa's results file, mme's folder of answer files) does so
without any run directory: `score_results_file` passes it the command's inputs by name and writes
`<out>/metrics.json`.

Optional task members this step uses: `eval_data(data, options)`, the data the evaluation reads when
an option names other data than the stage's (mme's --mme-root); `write` may return the names of the
files it wrote (when they depend on the data), which the manifest then lists instead of `outputs`.
"""
from __future__ import annotations

import inspect
import shutil
import time
from pathlib import Path

from eimctl.config import Config, fingerprint, load_config, to_dict
from eimctl.eim.diagnostics import summary_line, validation_diagnostics
from eimctl.eim.schedule import resolve_schedule, schedule_uses
from eimctl.models.factory import build_model
from eimctl.runtime.atomic import write_json
from eimctl.runtime.device import resolve_device
from eimctl.runtime.distributed import device_for, finish, is_writer, start
from eimctl.runtime.errors import EimError
from eimctl.runtime.progress import log
from eimctl.runtime.rundir import eval_dir, require_upstream, skip_or_run, stage_dir, write_manifest
from eimctl.runtime.weights import WEIGHTS
from eimctl.tasks import get_task


def _refuse_non_generating(stage: str, manifest: dict, specs: dict, where: Path) -> None:
    """A stage trained without loss_base (st, lm) was never taught to generate: scoring it says nothing."""
    trained_by = manifest.get("losses") or {}
    if "base" in trained_by:
        return
    generating = [name for name, spec in specs.items() if "base" in spec.losses]
    raise EimError(f"stage '{stage}' was trained by {', '.join(f'loss_{n}' for n in trained_by)} only, without "
                   "loss_base, so it was never taught to generate", where=str(where),
                   hint=f"evaluate a stage trained with loss_base ({', '.join(generating) or 'none in this schedule'}),"
                        " or pass --force to score it anyway")


def load_trained(run_dir: Path, stage: str, overrides: list[str] | None = None, *, force: bool = False):
    """(config, model in eval mode, the stage's manifest) of a complete stage; a stage that cannot
    generate is refused unless `force`."""
    folder = stage_dir(run_dir, stage)
    for item in overrides or []:
        if not item.startswith(("eval.", "train.device=", "scienceqa.parse")):
            raise EimError(f"evaluate accepts eval.*, scienceqa.parse* and train.device overrides only, not "
                           f"'{item}'", hint="model and data come from the trained stage's manifest")
    manifest = require_upstream(folder, f"stage '{stage}'", f"eimctl train-stage {stage} --run-dir {run_dir}")
    config: Config = load_config(base=manifest["config"], overrides=overrides)
    specs = resolve_schedule(config)
    if not force:
        _refuse_non_generating(stage, manifest, specs, folder)
    groups, losses = schedule_uses(specs)
    model, _ = build_model(config, groups=groups, losses=losses, weights=folder / "final" / WEIGHTS)
    model.eval()
    model.requires_grad_(False)  # nothing trains here (and a frozen CLIP reads the feature cache)
    return config, model, manifest


def evaluate(task_name: str, run_dir: Path, stage: str, *, overrides: list[str] | None = None,
             options: dict | None = None, force: bool = False, show: bool = True) -> Path:
    """Generate and score; returns the evaluation folder (skipped when complete with the same inputs).

    Under torchrun or srun the ranks share the generation by whole eval batches (eimctl/tasks/sharding.py)
    and every rank gets all predictions back; rank 0 alone scores, runs the diagnostics and writes."""
    started = time.time()
    task, options = get_task(task_name, where="eimctl evaluate TASK"), options or {}
    config, model, upstream = load_trained(run_dir, stage, overrides, force=force)
    # the image-ablation control is its own evaluation, next to the real one
    out = eval_dir(run_dir, stage, task.name + ("-zero-images" if config.eval.zero_images else ""))
    fingerprints = _fingerprints(task, config, upstream, options)
    show = show and is_writer()
    if skip_or_run(out, f"evaluation of '{stage}'", fingerprints, force=force) == "skip":
        log(f"evaluation already complete in {out} — skipping; --force reruns it", show)
        return out
    device = resolve_device(config.train.device)
    start(config.dist, device)  # every rank has read the folder's state before rank 0 clears it
    if out.exists() and is_writer():
        shutil.rmtree(out)
    device = device_for(device)
    model.to(device)
    eval_data = getattr(task, "eval_data", None)  # an option may name the benchmark's data (mme: --mme-root)
    split = task.read(eval_data(config.data, options) if eval_data else config.data, config.eval.split)
    predictions = task.predict(model, config, split, device, Path(run_dir) / "cache", show)
    if is_writer():
        result = {**task.score(predictions, split, config, options), "stage": stage}
        if config.eval.diagnostics:  # rank 0 alone, no collectives inside: the others wait in finish()
            result["diagnostics"] = validation_diagnostics(model, config, task, Path(run_dir) / "cache", device)
            log(summary_line(result["diagnostics"]), show)
        _write(task, out, predictions, result, config, fingerprints, started, stage)
    # Only on success: a rank that raised leaves without this closing barrier (which could meet another
    # rank's gather and wait for the whole timeout); its launcher then stops the other ranks.
    finish()
    return out


def _fingerprints(task, config: Config, upstream: dict, options: dict) -> dict:
    fingerprints = {"upstream": fingerprint(upstream["fingerprints"]), "eval": fingerprint(vars(config.eval)),
                    **{key: str(value or "") for key, value in options.items()}}
    section = getattr(config, task.name.replace("-", "_"), None)  # the task's own options (parse mode, ...)
    if section is not None:
        fingerprints["task"] = fingerprint(to_dict(section))
    return fingerprints


def _write(task, out: Path, predictions, result: dict, config: Config, fingerprints: dict, started: float,
           stage: str) -> None:
    """Predictions, metrics.json, then the manifest (the writing process only)."""
    out.mkdir(parents=True, exist_ok=True)
    written = task.write(out, predictions)
    result["wall_seconds"] = round(time.time() - started, 3)
    write_json(out / "metrics.json", result)
    write_manifest(out, step="evaluate", config={"eval": vars(config.eval)}, fingerprints=fingerprints,
                   started=started, outputs=[*(written or task.outputs), "metrics.json"],
                   extra={"stage": stage, "benchmark": task.name})


def _accepts(function, inputs: dict) -> bool:
    """Whether `function(**inputs)` matches its signature (the task takes these inputs)."""
    try:
        inspect.signature(function).bind(**inputs)
    except TypeError:
        return False
    return True


def score_results_file(task_name: str, inputs: dict, out: Path) -> Path:
    """Score files written elsewhere with the task's official scorer, `task.score_file(**inputs)` (scienceqa:
    problems, results, split; mme: answers); returns `<out>/metrics.json`."""
    task = get_task(task_name, where="eimctl evaluate TASK")
    score_file = getattr(task, "score_file", None)
    if score_file is None or not _accepts(score_file, inputs):
        given = ", ".join(f"--{name}" for name, value in inputs.items() if value is not None and name != "split")
        raise EimError(f"task '{task.name}' cannot score {given or 'files'}", where="eimctl evaluate",
                       hint="score files with the task that wrote them (scienceqa: --results, mme: --answers), "
                            "or evaluate a trained stage with --run-dir and --stage")
    result = score_file(**inputs)
    path = Path(out) / "metrics.json"
    write_json(path, result)
    return path
