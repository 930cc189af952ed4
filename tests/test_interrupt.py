"""SIGINT / SIGTERM during `train-stage`: a checkpoint at the step it stopped at, one line with the resume
command (which, run as printed, ends with the same weights as an uninterrupted run), exit code 128 + signal;
and `train.checkpoint_minutes` checkpointing by wall time.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.config import TrainConfig
from eimctl.runtime.interrupts import Interrupted
from eimctl.train.checkpoint import list_checkpoints
from eimctl.train.loop import fit

runner = CliRunner()
STAGE = "stages/base"
LINE = re.compile(r"^Interrupted by SIGTERM at step (\d+) of (\d+): checkpoint saved in (\S+)\. "
                  r"Resume with: (eimctl train-stage .+)$")


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def _signal_when(command: list[str], ready, signals: list[int], delay: str, timeout: float = 120.0):
    """Start `command` slowed down by EIMCTL_TEST_STEP_DELAY, send `signals` once `ready()`; (code, stderr)."""
    process = subprocess.Popen(command, env={**os.environ, "EIMCTL_TEST_STEP_DELAY": delay},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.01)
    for number in signals:
        process.send_signal(number)
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes(tmp_path: Path, tiny_overrides):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert runner.invoke(app, ["train-stage", "base", "--run-dir", str(straight), "-q", *tiny_overrides]).exit_code == 0
    metrics = cut / STAGE / "metrics.jsonl"
    code, stderr = _signal_when([sys.executable, "-m", "eimctl", "train-stage", "base", "--run-dir", str(cut), "-q",
                                 *tiny_overrides], lambda: _lines(metrics) >= 3, [signal.SIGTERM], "0.2")
    assert code == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    match = LINE.match(lines[0])
    assert match, lines[0]
    step, total, folder, resume_with = int(match[1]), int(match[2]), Path(match[3]), match[4]
    assert 3 <= step < total
    assert folder == cut / STAGE / "checkpoints" / f"step-{step:06d}" and folder.is_dir()
    assert list_checkpoints(cut / STAGE / "checkpoints")[-1] == folder
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, step + 1))
    assert not (cut / STAGE / "manifest.json").exists()

    args = shlex.split(resume_with)
    assert args[0] == "eimctl"
    resumed = subprocess.run([sys.executable, "-m", "eimctl", *args[1:]], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming stage 'base' from step {step}" in resumed.stderr + resumed.stdout
    a = load_file(straight / STAGE / "final/trainable.safetensors")
    b = load_file(cut / STAGE / "final/trainable.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_exits_at_once(tmp_path: Path, tiny_overrides):
    metrics = tmp_path / STAGE / "metrics.jsonl"
    code, stderr = _signal_when([sys.executable, "-m", "eimctl", "train-stage", "base", "--run-dir", str(tmp_path),
                                 "-q", *tiny_overrides], lambda: _lines(metrics) >= 1,
                                [signal.SIGTERM, signal.SIGINT], "3")
    assert code == 128 + signal.SIGINT, stderr
    assert "SIGINT again: exiting without a checkpoint" in stderr
    assert list_checkpoints(tmp_path / STAGE / "checkpoints") == []


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)


def _fit(tmp_path: Path, calls=None, **train) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, data = _Toy(), torch.randn(10, 3)

    def losses(batch: dict) -> dict:
        if calls is not None:
            calls(len(list_checkpoints(tmp_path / "checkpoints")))
        return {"loss_x": model.linear(batch["x"]).pow(2).mean()}

    cfg = TrainConfig(**{"epochs": 1, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1000,
                         "keep_checkpoints": 100, "log_every": 1, **train})
    return fit(stage="toy", model=model, losses=losses, collate=lambda idx: {"indices": idx, "x": data[idx]},
               dataset_size=10, cfg=cfg, out_dir=tmp_path, config_fp="fp", device=torch.device("cpu"), show=False)


def test_checkpoint_minutes_adds_checkpoints_by_wall_time(tmp_path: Path):
    _fit(tmp_path / "off")
    assert list_checkpoints(tmp_path / "off" / "checkpoints") == []
    _fit(tmp_path / "on", checkpoint_minutes=1e-9)   # due after every step (never after the last: final/ is)
    names = [p.name for p in list_checkpoints(tmp_path / "on" / "checkpoints")]
    assert names == [f"step-00000{n}" for n in (1, 2, 3, 4)]


def test_fit_checkpoints_at_the_signalled_step_and_restores_handlers(tmp_path: Path):
    before = signal.getsignal(signal.SIGTERM)
    step = iter(range(1, 100))

    def calls(_):
        if next(step) == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives during step 3; the loop stops after it
    with pytest.raises(Interrupted) as stopped:
        _fit(tmp_path, calls=calls)
    assert (stopped.value.step, stopped.value.total, stopped.value.exit_code) == (3, 5, 143)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000003"]
    assert signal.getsignal(signal.SIGTERM) is before
