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
    assert {"st-only", "lm-only", "ie-only", "all-in-one", "st-lm-swapped", "ie-first", "st-lm-together"} <= names
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


def test_ie_is_always_paired_with_base_and_table6_trains_st_and_lm_together():
    ie_first = {s.name: s for s in training_order(load_config([BASE, ROOT / "examples/ablations/ie-first.yaml"]))}
    assert ie_first["base-ie"].losses == {"base": 1.0, "ie": 1.0} and ie_first["base-ie"].init == "pretrained"
    together = training_order(load_config([BASE, ROOT / "examples/ablations/st-lm-together.yaml"]))
    assert [s.name for s in together] == ["st-lm", "base-ie"] and together[0].losses == {"st": 1.0, "lm": 1.0}


def test_the_coco_eim_recipe_resolves_and_its_schedule_prints():
    config = load_config(ROOT / "examples/coco-eim.yaml")
    assert (config.model.clip.remove_projection, config.model.clip.tokens, config.model.projector.type) == \
        (True, "full", "ffn")
    assert (config.train.lr, config.train.warmup_steps, config.train.batch_size, config.train.epochs) == \
        (2e-5, 5000, 40, 10)
    assert config.eim.clip_tuning == "network" and config.eim.prompt_hidden == 1411   # 26,072,100 at ViT-B/32
    result = runner.invoke(app, ["schedule", "--config", str(ROOT / "examples/coco-eim.yaml"), "--run-dir", "runs/x"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("eimctl")]
    assert lines[0].startswith("eimctl build-queues")
    assert [line.split()[2] for line in lines if line.startswith("eimctl train-stage")] == ["base", "st", "lm", "base-ie"]
    # the whole recipe: evaluations of the stages that generate (trained with loss_base), then the report
    assert [line.split()[-1] for line in lines if line.startswith("eimctl evaluate coco")] == ["base", "base-ie"]
    assert lines[-1] == "eimctl report runs/x"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("eimctl ")
