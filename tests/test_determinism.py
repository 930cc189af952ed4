"""Same config + seed on CPU: identical logged losses and weights, run to run (README: Robustness)."""
import json
from pathlib import Path

from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.cli import app

runner = CliRunner()


def _run(run: Path, overrides: list[str]) -> tuple[list[float], dict]:
    result = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *overrides])
    assert result.exit_code == 0, result.output
    stage = run / "stages/base"
    losses = [json.loads(line)["loss"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return losses, load_file(stage / "final/trainable.safetensors")


def test_same_config_and_seed_give_identical_losses_on_cpu(tmp_path: Path, tiny_overrides):
    overrides = [*tiny_overrides, "train.device=cpu"]
    first_losses, first = _run(tmp_path / "a", overrides)
    second_losses, second = _run(tmp_path / "b", overrides)     # its own feature cache, built again
    assert first_losses == second_losses                         # bit for bit, not approximately
    assert all((first[k] == second[k]).all() for k in first)
    other_losses, _ = _run(tmp_path / "c", [*overrides, "train.seed=7"])
    assert other_losses != first_losses                          # the seed does matter
