"""`eimctl train-stage base` through the real CLI: artifacts, skip, refusal, resume parity."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.cli import app

runner = CliRunner()


def train(run_dir: Path, overrides: list[str], *extra: str):
    return runner.invoke(app, ["train-stage", "base", "--run-dir", str(run_dir), "-q", *extra, *overrides])


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "stages/base/metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_base_stage_artifacts_and_skip(tmp_path: Path, tiny_overrides):
    result = train(tmp_path / "run", tiny_overrides)
    assert result.exit_code == 0, result.output
    stage = tmp_path / "run/stages/base"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["outputs"]) == {"config.yaml", "metrics.jsonl", "final/trainable.safetensors",
                                        "diagnostics.json"}
    assert set(manifest["fingerprints"]) == {"config", "model", "data"}
    assert manifest["versions"]["torch"]
    weights = load_file(stage / "final/trainable.safetensors")
    assert any(k.startswith("projector.") for k in weights) and any(k.startswith("lm.") for k in weights)
    assert not any(k.startswith("clip.") for k in weights)          # CLIP is frozen in `base`
    logged = metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == list(range(1, 13))         # 48 samples / 8 x 2 epochs
    assert logged[-1]["loss"] < logged[0]["loss"]                     # it learns
    before = (stage / "manifest.json").stat().st_mtime_ns
    again = runner.invoke(app, ["train-stage", "base", "--run-dir", str(tmp_path / "run"), *tiny_overrides])
    assert again.exit_code == 0 and "skipping" in again.output
    assert (stage / "manifest.json").stat().st_mtime_ns == before


def test_other_config_in_same_run_dir_is_refused(tmp_path: Path, tiny_overrides):
    assert train(tmp_path / "run", tiny_overrides).exit_code == 0
    result = train(tmp_path / "run", tiny_overrides + ["train.lr=0.002"])
    assert result.exit_code == 1
    assert "built from another config" in result.output and "--force" in result.output


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path, tiny_overrides):
    assert train(tmp_path / "straight", tiny_overrides).exit_code == 0
    command = [sys.executable, "-m", "eimctl.cli", "train-stage", "base", "--run-dir", str(tmp_path / "cut"), "-q",
               *tiny_overrides]
    killed = subprocess.run(command, env={**os.environ, "EIMCTL_TEST_CRASH_AT_STEP": "5"}, capture_output=True)
    assert killed.returncode == 137
    assert not (tmp_path / "cut/stages/base/manifest.json").exists()     # nothing claims to be complete
    assert [m["step"] for m in metrics(tmp_path / "cut")] == list(range(1, 6))
    resumed = subprocess.run(command + ["--resume", "auto"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "straight/stages/base/final/trainable.safetensors")
    b = load_file(tmp_path / "cut/stages/base/final/trainable.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    straight, cut = metrics(tmp_path / "straight"), metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == [m["step"] for m in straight]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(straight, cut)) < 1e-4


def test_resume_never_refuses_existing_checkpoints(tmp_path: Path, tiny_overrides):
    command = [sys.executable, "-m", "eimctl.cli", "train-stage", "base", "--run-dir", str(tmp_path / "r"), "-q",
               *tiny_overrides]
    subprocess.run(command, env={**os.environ, "EIMCTL_TEST_CRASH_AT_STEP": "3"}, capture_output=True)
    result = subprocess.run(command + ["--resume", "never"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert "--resume auto" in result.stderr and "Traceback" not in result.stderr


def test_tensorboard_logger_writes_the_same_curves(tmp_path: Path, tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *tiny_overrides,
                                 "train.loggers=tensorboard"])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run / "stages/base/tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (run / "stages/base/metrics.jsonl").read_text().splitlines()]
    scalars = events.Scalars("loss")
    assert [s.step for s in scalars] == [r["step"] for r in logged]
    assert [s.value for s in scalars] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
