"""Launching on many GPUs: `eimctl schedule --launcher` prefixes the compute steps exactly, and every
script in examples/launch is valid bash (sbatch files included); single-node.sh runs the schedule."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eimctl.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples/launch"
CONFIG = ["--config", "examples/coco-eim.yaml"]
STAGES = [("base", "from pretrained; trains projector, lm by 1*loss_base"),
          ("st", "from pretrained; trains projector by 1*loss_st"),
          ("lm", "from st; trains lm by 1*loss_lm"),
          ("base-ie", "from lm; trains projector, lm, clip_prompts by 1*loss_base + 1*loss_ie")]
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def _expected(run: str) -> list[str]:
    """`eimctl schedule` for examples/coco-eim.yaml, with `run` starting every step but the report."""
    cfg = " --config examples/coco-eim.yaml"
    return [f"{run} build-queues{cfg}",
            *(f"{run} train-stage {s} --run-dir runs/x{cfg}    # {note}" for s, note in STAGES),
            f"{run} evaluate coco --run-dir runs/x --stage base",
            f"{run} evaluate coco --run-dir runs/x --stage base-ie",
            "eimctl report runs/x"]


def _schedule(*launcher: str) -> list[str]:
    result = runner.invoke(app, ["schedule", *CONFIG, "--run-dir", "runs/x", *launcher])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_without_a_launcher_the_schedule_is_unchanged():
    assert _schedule() == _expected("eimctl")
    assert _schedule("--launcher", "") == _expected("eimctl")


@pytest.mark.parametrize("launcher, run", [
    ("torchrun --nproc_per_node 8 --no-python", "torchrun --nproc_per_node 8 --no-python eimctl"),
    ("torchrun --standalone --nproc_per_node 2", "torchrun --standalone --nproc_per_node 2 -m eimctl"),
    ("torchrun --nproc_per_node 2 -m", "torchrun --nproc_per_node 2 -m eimctl"),
    ("python -m torch.distributed.run --nproc_per_node 2",
     "python -m torch.distributed.run --nproc_per_node 2 -m eimctl"),
    (".venv/bin/torchrun --nnodes 2 --no_python", ".venv/bin/torchrun --nnodes 2 --no_python eimctl"),
    ("srun --cpu-bind=v", "srun --cpu-bind=v eimctl"),
    ("srun torchrun --nproc_per_node 8", "srun torchrun --nproc_per_node 8 -m eimctl"),
], ids=["no-python", "python-script", "own-module-flag", "python-m", "venv-path", "srun", "srun-torchrun"])
def test_the_launcher_prefixes_build_queues_stages_and_evaluations(launcher, run):
    assert _schedule("--launcher", launcher) == _expected(run)


def test_a_launcher_that_is_not_a_command_line_is_one_error():
    result = runner.invoke(app, ["schedule", *CONFIG, "--launcher", "srun 'unclosed"])
    assert result.exit_code == 1 and "--launcher" in result.output and "Traceback" not in result.output


def test_the_module_form_runs():
    """Without --no-python torchrun starts `python -m eimctl ...`: that entry point must exist."""
    result = subprocess.run([sys.executable, "-m", "eimctl", "--version"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("eimctl "), result.stderr


def test_every_launch_pattern_is_there():
    assert {p.name for p in SCRIPTS} == {"single-node.sh", "multi-node-ssh.sh", "slurm-per-gpu.sbatch",
                                         "slurm-torchrun.sbatch", "slurm-build-queues-array.sbatch"}
    assert (LAUNCH / "README.md").is_file()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_launch_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_single_node_runs_every_step_of_the_schedule_in_order(tmp_path):
    """With a recording torchrun and eimctl (real for `schedule`), the script launches each line once."""
    bin_dir, log = tmp_path / "venv/bin", tmp_path / "calls.txt"
    bin_dir.mkdir(parents=True)
    real = Path(sys.executable).parent / "eimctl"
    scripts = {"torchrun": f'echo "torchrun $*" >> {log}\n',
               "eimctl": f'if [ "$1" = schedule ]; then exec {real} "$@"; fi\necho "eimctl $*" >> {log}\n'}
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "VENV": str(tmp_path / "venv"), "NPROC": "2"}
    result = subprocess.run(["bash", str(LAUNCH / "single-node.sh"), "runs/x", *CONFIG], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    run = "torchrun --standalone --nproc_per_node 2 --max-restarts 2 --no-python eimctl"
    assert log.read_text().splitlines() == [line.split("    #")[0] for line in _expected(run)]
