"""Every ablation in examples/ablations runs through the same commands, from configuration alone."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.config import load_config
from eimctl.eim.schedule import training_order

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = sorted((ROOT / "examples/ablations").glob("*.yaml"))
BASE = ROOT / "examples/demo-eim.yaml"


def test_the_ablation_set_is_complete():
    names = {p.stem for p in ABLATIONS}
    assert {"st-only", "lm-only", "ie-only", "all-in-one", "st-lm-swapped", "ie-first"} <= names
    assert {f"features-{p}-{t}" for p in ("proj", "noproj") for t in ("pooled", "full")} <= names


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_runs_through_the_cli(tmp_path: Path, tiny_overrides, ablation):
    overrides = tiny_overrides + [f"eim.queues_dir={tmp_path / 'queues'}", "eim.prompt_tokens=2",
                                  "train.max_steps=2"]
    configs = ["--config", str(BASE), "--config", str(ablation)]
    specs = training_order(load_config([BASE, ablation], overrides))
    if any(spec.queues for spec in specs):
        result = runner.invoke(app, ["build-queues", "-q", *configs, *overrides])
        assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for spec in specs:
        result = runner.invoke(app, ["train-stage", spec.name, "--run-dir", str(run), "-q", *configs, *overrides])
        assert result.exit_code == 0, (spec.name, result.output)
        manifest = json.loads((run / f"stages/{spec.name}/manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["losses"] == spec.losses
        logged = json.loads((run / f"stages/{spec.name}/metrics.jsonl").read_text().splitlines()[-1])
        assert {f"loss_{name}" for name in spec.losses} <= set(logged)
