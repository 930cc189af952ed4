"""The whole spine through the real CLI: train-stage base -> evaluate coco -> report."""
import json
from pathlib import Path

from typer.testing import CliRunner

from eimctl.cli import app

runner = CliRunner()


def test_train_evaluate_report(tmp_path: Path, tiny_overrides):
    run = tmp_path / "run"
    assert runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *tiny_overrides]).exit_code == 0
    result = runner.invoke(app, ["evaluate", "coco", "--run-dir", str(run), "eval.max_new_tokens=6",
                                 "eval.fixed_caption_candidates=4"])
    assert result.exit_code == 0, result.output
    assert "BLEU-4" in result.output and "best single fixed caption" in result.output
    out = run / "eval/base-coco"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) >= {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}
    assert metrics["metrics"]["SPICE"] is None and "CoreNLP" in metrics["unavailable"]["SPICE"]
    assert metrics["n_images"] == 6
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 6 and all(set(p) == {"image_id", "caption"} for p in predictions)
    floor = metrics["fixed_caption_baseline"]
    assert floor["CIDEr"]["caption"] and 0 <= floor["Bleu_4"]["score"] <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["outputs"]) == {"predictions.json", "metrics.json"}

    report = runner.invoke(app, ["report", str(run)])
    assert report.exit_code == 0, report.output
    text = (run / "report/report.md").read_text()
    assert "base" in text and "BLEU-4" in text
    assert (run / "report/loss_run_base.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_before_training_is_refused(tmp_path: Path):
    result = runner.invoke(app, ["evaluate", "coco", "--run-dir", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "stage 'base' has not been run" in result.output and "eimctl train-stage base" in result.output


def test_evaluate_refuses_model_overrides(tmp_path: Path, tiny_overrides):
    run = tmp_path / "run"
    assert runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *tiny_overrides]).exit_code == 0
    result = runner.invoke(app, ["evaluate", "coco", "--run-dir", str(run), "model.lm.name=gpt2"])
    assert result.exit_code == 1 and "overrides only" in result.output and "model.lm.name" in result.output


def test_help_explains_every_command():
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "train-stage" in top.output and "report" in top.output
    for command in (["train-stage"], ["evaluate", "coco"], ["report"], ["demo-data"], ["demo-pretrain"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, command
