"""The `eimctl` command line. Each command parses, loads config and calls one function."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from eimctl.runtime.errors import EimError, report_and_exit
from eimctl.runtime.interrupts import Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate CLIP + projector + LM models with EIM.\n\n"
                       "Pipeline: build-queues -> train-stage (st, lm, base-ie | base) -> evaluate -> report. "
                       "Steps pass artifacts through a run directory (runs/<run>/).")


def _print_version(value: bool) -> None:
    if value:
        from eimctl import __version__
        print(f"eimctl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit."),
             verbose: bool = typer.Option(False, "--verbose", help="Show third-party download logs, retries "
                                                                   "and progress bars (EIMCTL_VERBOSE=1).")) -> None:
    """Train and evaluate CLIP + projector + LM models with EIM."""
    if verbose:
        os.environ["EIMCTL_VERBOSE"] = "1"


def user_errors(command):
    """Turn every EimError (and unexpected failures) into one line and exit code 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (EimError, Exception) as error:  # noqa: B014 — both are reported the same way
            if isinstance(error, (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt)):
                raise
            if isinstance(error, Interrupted):  # stopped by a signal after a checkpoint: one line, 128 + signal
                print(error.line(), file=sys.stderr)
                sys.exit(error.exit_code)
            report_and_exit(error)
    return wrapper


RESUME_CHOICES = ("auto", "never")


RUN_DIR = typer.Option(..., "--run-dir", help="Run directory: holds stages/, eval/, report/ of one run.")
CONFIG = typer.Option(None, "--config", "-c", help="YAML config; repeat to layer files (defaults < files in "
                                                   "order < KEY=VALUE overrides). A file's `stages:` replaces "
                                                   "the schedule.")
FORCE = typer.Option(False, "--force", help="Redo a step even if it is complete.")
QUIET = typer.Option(False, "--quiet", "-q", help="Print only errors.")


def _config_args(config: Optional[List[Path]], overrides: Optional[List[str]]) -> str:
    """The command line's config part (" --config a.yaml k=v"), to print commands that run as printed."""
    import shlex
    return "".join(f" --config {shlex.quote(str(c))}" for c in config or []) + \
        "".join(f" {shlex.quote(o)}" for o in overrides or [])


@app.command("train-stage")
@user_errors
def train_stage(stage: str = typer.Argument(..., help="Stage of the schedule: st, lm, base-ie (EIM), base "
                                                     "(plain baseline), or any stage the config's `stages` "
                                                     "defines."),
                overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE config overrides, "
                                                                           "e.g. train.lr=1e-4"),
                run_dir: Path = RUN_DIR, config: Optional[List[Path]] = CONFIG,
                resume: str = typer.Option("auto", help="auto: continue from the last checkpoint; "
                                                        "never: refuse if checkpoints exist."),
                force: bool = FORCE, quiet: bool = QUIET):
    """Train one stage into RUN_DIR/stages/STAGE (resumable; checkpoints in safetensors).

    A stage starts from its `init` (pretrained models or an earlier stage of the same run and
    config) and trains only its own modules with its own losses; see eimctl/schedule.py.
    """
    from eimctl.config import load_config
    from eimctl.steps.train_stage import train_stage as run_stage

    if resume not in RESUME_CHOICES:  # checked here so it is one `Error:` line, exit code 1
        raise EimError(f"--resume must be auto or never, not '{resume}'", where="eimctl train-stage",
                       hint="pass --resume auto (continue) or --resume never (refuse to continue)")
    cfg = load_config(config, overrides)
    run_stage(cfg, run_dir, stage, force=force, resume=resume, show=not quiet,
              config_args=_config_args(config, overrides))


@app.command("schedule")
@user_errors
def schedule(overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE config overrides."),
             config: Optional[List[Path]] = CONFIG,
             run_dir: Path = typer.Option(Path("runs/<run>"), "--run-dir", help="Shown in the printed commands."),
             launcher: str = typer.Option("", "--launcher", help=(
                 "Start build-queues, every train-stage and every evaluate line with this launcher, e.g. "
                 "\"torchrun --standalone --nproc_per_node 8 --no-python\" or \"srun\" (report stays one "
                 "process). After torchrun with --no-python (or -m), and after any other launcher, the "
                 "line goes on with the `eimctl` console script; after torchrun without either, which "
                 "starts a Python program, with `-m eimctl`. The launcher is printed as given."))):
    """Print the whole recipe in order: build-queues, every stage, the evaluations, the report."""
    from eimctl.config import load_config
    from eimctl.eim.schedule import recipe_commands

    cfg = load_config(config, overrides)
    print("\n".join(recipe_commands(cfg, _config_args(config, overrides), str(run_dir), launcher)))


@app.command("build-queues")
@user_errors
def build_queues(overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE config overrides."),
                 config: Optional[List[Path]] = CONFIG,
                 encoder: Optional[str] = typer.Option(None, help="CLIP encoder: an open_clip name or an alias "
                                                                  "(clip-vit-b32, clip-vit-b16, clip-vit-l14, "
                                                                  "clip-vit-l14-336)."),
                 shard: Optional[str] = typer.Option(None, "--shard", help="I/N: build only the queue parts p "
                                                           "with p mod N = I and exit, for N separate jobs (a "
                                                           "job array); then run the plain command to assemble."),
                 force: bool = FORCE, quiet: bool = QUIET):
    """Build the key queues Kt, Ke, Kb (Parquet, one row per training sample) into the queue store.

    Under torchrun/srun the ranks share the work; rank 0 assembles."""
    from eimctl.config import load_config
    from eimctl.models.clip import encoder_overrides
    from eimctl.steps.build_queues import build_queues as run_build
    import shlex

    cfg = load_config(config, list(overrides or []) + encoder_overrides(encoder))
    again = _config_args(config, overrides) + (f" --encoder {shlex.quote(encoder)}" if encoder else "")
    run_build(cfg, force=force, show=not quiet, shard=shard, config_args=again)


@app.command("evaluate")
@user_errors
def evaluate(task: str = typer.Argument(..., help="The task whose benchmark scores the stage: "
                                                  "coco (captioning: BLEU-1..4, METEOR, ROUGE_L, CIDEr, SPICE); "
                                                  "scienceqa (ScienceQA's official accuracy table: NAT ... Avg); "
                                                  "mme (MME's official perception and cognition scores)."),
             overrides: Optional[List[str]] = typer.Argument(None, help="eval.* overrides, e.g. eval.beam_size=3"),
             run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory: holds stages/, eval/, "
                                                                           "report/ of one run."),
             stage: str = typer.Option("base", help="Trained stage to evaluate."),
             spice_jars: Optional[Path] = typer.Option(None, help="coco: folder with Stanford CoreNLP 3.6.0 jars; "
                                                                  "without it SPICE is unavailable."),
             problems: Optional[Path] = typer.Option(None, help="scienceqa, with --results: the problems.json "
                                                                "whose problems are scored."),
             results: Optional[Path] = typer.Option(None, help="Score this results file instead of a trained stage "
                                                               "(scienceqa: {\"results\": {qid: index}} or {qid: "
                                                               "index}); needs --problems and --out."),
             answers: Optional[Path] = typer.Option(None, help="mme: score this folder of answer files (<subtask>.txt, "
                                                               "image<TAB>question<TAB>gt<TAB>prediction) instead of "
                                                               "a trained stage; all 14 subtasks; needs --out."),
             mme_root: Optional[Path] = typer.Option(None, help="mme: the MME release folder (one folder per subtask) "
                                                                "to evaluate on, instead of the stage's data.path."),
             out: Optional[Path] = typer.Option(None, help="With --results or --answers: folder for metrics.json."),
             split: str = typer.Option("test", help="With --results: the problems' split scored (official: test)."),
             force: bool = typer.Option(False, "--force", help="Redo a complete evaluation; also score a stage "
                                                              "trained without loss_base (st, lm), which is "
                                                              "refused otherwise."),
             quiet: bool = QUIET):
    """Score a trained stage on a task's benchmark (eimctl/tasks/): generate, then score officially.

    With --results (scienceqa) or --answers (mme), score files written elsewhere instead (no run directory,
    no model).
    """
    if results is not None or answers is not None:
        _score_file_and_print(task, problems, results, answers, out, split, quiet)
        return
    if problems is not None or out is not None:
        raise EimError("--problems and --out go with --results (--out also with --answers)", where="eimctl evaluate",
                       hint="pass --results FILE to score a file, or drop them to evaluate a trained stage")
    if run_dir is None:
        raise EimError("missing option --run-dir", where="eimctl evaluate",
                       hint="pass --run-dir RUN (or --results FILE --problems P --out DIR to score a file)")
    options = {"spice_jars": spice_jars}
    if task == "mme":  # always fingerprinted, so an evaluation on another MME folder is not taken for this one
        options["mme_root"] = mme_root
    elif mme_root is not None:
        raise EimError("--mme-root goes with the mme task", where="eimctl evaluate",
                       hint=f"drop --mme-root, or run `eimctl evaluate mme` (not {task})")
    _evaluate_and_print(task, run_dir, stage, overrides, options, force, quiet)


def _score_file_and_print(task_name: str, problems: Optional[Path], results: Optional[Path],
                          answers: Optional[Path], out: Optional[Path], split: str, quiet: bool) -> None:
    import json
    from eimctl.steps.evaluate import score_results_file
    from eimctl.tasks import get_task

    if results is not None and answers is not None:
        raise EimError("pass --results or --answers, not both", where="eimctl evaluate",
                       hint="--results FILE for scienceqa, --answers DIR for mme")
    flag, needed = (("--answers", [("--out", out)]) if answers is not None
                    else ("--results", [("--problems", problems), ("--out", out)]))
    missing = [name for name, value in needed if value is None]
    if missing:
        raise EimError(f"{flag} needs {' and '.join(missing)}", where="eimctl evaluate",
                       hint="pass --problems problems.json --results FILE --out DIR (scienceqa), or --answers DIR "
                            "--out DIR (mme)")
    if answers is not None and problems is not None:
        raise EimError("--problems goes with --results, not --answers", where="eimctl evaluate",
                       hint="drop --problems")
    inputs = {"answers": answers} if answers is not None else {"problems": problems, "results": results,
                                                                "split": split}
    path = score_results_file(task_name, inputs, out)
    if not quiet:
        lines = get_task(task_name).summary(json.loads(path.read_text()))
        print(f"{lines[0]}  -> {path}")
        for line in lines[1:]:
            print(line)


def _evaluate_and_print(task_name: str, run_dir: Path, stage: str, overrides, options: dict, force: bool,
                        quiet: bool) -> None:
    import json
    from eimctl.steps.evaluate import evaluate
    from eimctl.tasks import get_task

    from eimctl.runtime.distributed import is_writer

    out = evaluate(task_name, run_dir, stage, overrides=overrides, options=options, force=force, show=not quiet)
    if not quiet and is_writer():  # under torchrun, rank 0 prints the result once
        lines = get_task(task_name).summary(json.loads((out / "metrics.json").read_text()))
        print(f"{lines[0]}  -> {out}")
        for line in lines[1:]:
            print(line)


@app.command("chat")
@user_errors
def chat(run_dir: Path = RUN_DIR,
         stage: str = typer.Option("base", help="Trained stage to talk to (a lavin or llama-adapter stage)."),
         image: Optional[Path] = typer.Option(None, help="Image for the instruction (interactive: the first one; "
                                                         "switch with /image PATH, drop with /noimage)."),
         instruction: Optional[str] = typer.Option(None, help="Answer this one instruction (streamed) and exit."),
         batch: Optional[Path] = typer.Option(None, help="JSONL file, one {\"instruction\": str, \"image\": "
                                                         "optional path relative to the file} a line; answered "
                                                         "in batches of eval.batch_size."),
         out: Optional[Path] = typer.Option(None, help="With --batch: write the answers here (JSONL: instruction, "
                                                       "image, response; default stdout)."),
         max_new_tokens: int = typer.Option(128, help="Most tokens per answer."),
         temperature: float = typer.Option(0.0, help="0: greedy; > 0: top-p sampling at this temperature."),
         top_p: float = typer.Option(0.9, help="Nucleus of the sampling (with --temperature > 0)."),
         seed: int = typer.Option(0, help="Seed of the sampling: the same seed gives the same answers."),
         force: bool = typer.Option(False, "--force", help="Also talk to a stage trained without loss_base "
                                                          "(st, lm), which is refused otherwise.")):
    """Talk to a trained stage: interactive (answers streamed), one instruction, or a JSONL batch.

    Without --instruction and --batch, read instructions from stdin until an empty line or Ctrl-D.
    """
    from eimctl.steps.chat import Decoding, chat as run_chat
    from eimctl.steps.evaluate import load_trained  # the stage's model, rebuilt as `evaluate` rebuilds it

    decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    run_chat(load_trained, run_dir, stage, decoding, instruction=instruction, image=image, batch=batch, out=out,
             force=force)


@app.command("report")
@user_errors
def report(run_dirs: List[Path] = typer.Argument(..., help="One or more run directories."),
           out: Optional[Path] = typer.Option(None, help="Output folder (default: <first run>/report)."),
           aggregate: bool = typer.Option(False, help="Also give mean ± spread over runs whose folders share "
                                                      "a name (one recipe over several seeds)."),
           baseline: str = typer.Option("clipcap:base", help="RUN_FOLDER_NAME:STAGE every configuration is "
                                                              "compared with, seed by seed, under --aggregate."),
           quiet: bool = QUIET):
    """Tabulate metrics per run and stage (terminal + report.md) and plot training loss curves."""
    from eimctl.steps.report import report as run_report

    group, _, stage = baseline.partition(":")
    run_report(run_dirs, out or (run_dirs[0] / "report"), aggregate=aggregate, show=not quiet,
               baseline=(group, stage or "base"))


DEMO_KINDS = ("captions", "scienceqa", "chat")


def _demo_kind(kind: str) -> str:
    if kind not in DEMO_KINDS:
        raise EimError(f"--kind must be one of {', '.join(DEMO_KINDS)}, not '{kind}'", where="eimctl demo-*",
                       hint="captions: the COCO-style demo; scienceqa: the ScienceQA-format demo; chat: "
                            "instruction data + MME-format questions")
    return kind


@app.command("demo-data")
@user_errors
def demo_data(out: Path = typer.Option(Path("demo/data"), help="Where to write the data set."),
              kind: str = typer.Option("captions", help="captions (rendered scenes with captions, JSONL), "
                                                        "scienceqa (the official problems.json layout over the "
                                                        "same scenes) or chat (Alpaca/LLaVA-format instructions "
                                                        "and MME-format yes/no questions)."),
              seed: int = typer.Option(0, help="Seed of the scenes and captions (same seed, same files)."),
              world_images: int = typer.Option(6000, help="Images in the pretraining corpus of the demo's "
                                                          "CLIP and LM (all compositions)."),
              train_images: int = typer.Option(520, help="Images in the captioner's training split (2 "
                                                         "captions each; held-out compositions excluded)."),
              quiet: bool = QUIET):
    """Generate an embedded demo data set: rendered scenes with describing captions, or ScienceQA problems."""
    if _demo_kind(kind) == "chat":
        from eimctl.data.chat_demo import generate_chat_demo
        summary = generate_chat_demo(out, seed=seed)
    elif kind == "scienceqa":
        from eimctl.data.scienceqa_demo import generate_scienceqa_demo
        # every TXT problem answerable from its hint alone, so the image ablation reads cleanly
        counts = generate_scienceqa_demo(out, seed=seed, text_image_share=0.0)["counts"]
        summary = {split: counts[split]["problems"] for split in counts} | {
            "test": {k: v for k, v in counts["test"].items() if k != "always_a_correct"}}
    else:
        from eimctl.data.demo import generate_demo_data
        summary = generate_demo_data(out, seed=seed, n_world_images=world_images, n_train_images=train_images)
    if not quiet:
        print(f"demo data in {out}: {summary}")


@app.command("demo-pretrain")
@user_errors
def demo_pretrain(data: Path = typer.Option(Path("demo/data"), help="Demo data folder (from demo-data)."),
                  out: Path = typer.Option(Path("demo/models"), help="Where to write the models."),
                  kind: str = typer.Option("captions", help="captions: the CLIP and GPT-2-style LM (clip/, lm/) "
                                                            "on the caption demo's world split; scienceqa / "
                                                            "chat: a tiny LLaMA (llama/) on that demo's text."),
                  only: str = typer.Option("", help="captions only: 'clip' or 'lm' to pretrain just one."),
                  seed: int = typer.Option(0, help="Seed of the models' initialisation and data order."),
                  quiet: bool = QUIET):
    """Pretrain the demo's small models (stand-ins for CLIP, GPT-2 and LLaMA), each skipped when done."""
    log = (lambda *_: None) if quiet else print
    if _demo_kind(kind) in ("scienceqa", "chat"):
        from eimctl.demo.pretrain_llama import pretrain_demo_llama
        # the chat set's documents are single sentences: 3 epochs of them take what 8 of ScienceQA's do
        pretrain_demo_llama(data, out, seed=seed, log=log, **({"documents": "chat", "epochs": 3} if kind == "chat"
                                                               else {"documents": "problem+format"}))
        return
    from eimctl.demo.pretrain import pretrain_demo_clip, pretrain_demo_lm

    if only not in ("", "clip", "lm"):
        raise EimError(f"--only must be clip or lm, not '{only}'", where="eimctl demo-pretrain")
    if only in ("", "clip"):
        pretrain_demo_clip(data, out, seed=seed, log=log)
    if only in ("", "lm"):
        pretrain_demo_lm(data, out, seed=seed, log=log)


def main() -> None:
    if not os.environ.get("EIMCTL_DEBUG"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not (os.environ.get("EIMCTL_VERBOSE") or "--verbose" in sys.argv):
        # Third-party progress bars ("Writing model shards", "Loading weights") clutter eimctl's own
        # progress; transformers and huggingface_hub read this when they are first imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()


if __name__ == "__main__":
    main()
