"""ScienceQA end to end through the CLI, for both instruction families, on a tiny generated set: key queues over
instruction + response (QCM -> ALE), the segmented schedule st -> lm -> adapter, then `evaluate scienceqa`
(generation, the official parse, the official scorer, the official results file) and the image-ablation control."""
import json

import pytest
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.data.scienceqa_demo import generate_scienceqa_demo

runner = CliRunner()


@pytest.fixture(scope="module")
def sqa(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sqa")
    data = root / "data"
    generate_scienceqa_demo(data, n_train=24, n_val=6, n_test=12, image_size=32)
    return {"data": data, "clip": tiny.make_tiny_clip(root / "clip", layers=4),
            "lm": tiny.make_tiny_llama(root / "llama", words=tiny.scienceqa_words(
                data, ("Image", "N", "A", "B", "C", "D", "E", "/", "\\", "n")))}


FAMILY = {"llama-adapter": ["model.llama_adapter.layers=2", "model.llama_adapter.prompt_len=4",
                            "model.llama_adapter.st_depth=1", "model.llama_adapter.st_heads=2",
                            "model.clip.tokens=full"],
          "lavin": ["model.clip.tokens=cls_every_k", "model.clip.cls_every=2", "model.lavin.adapter_dropout=0"]}


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_scienceqa_schedule_and_evaluation_through_the_cli(family, sqa, tmp_path):
    common = [f"model.family={family}", *FAMILY[family], f"model.clip.name={sqa['clip']}", "model.clip.pretrained=",
              f"model.lm.name={sqa['lm']}", "data.task=scienceqa", f"data.path={sqa['data']}",
              "data.max_caption_tokens=256", f"eim.queues_dir={tmp_path / 'queues'}", "train.batch_size=8",
              "train.warmup_steps=0", "train.lr=1e-2", "train.log_every=1", "train.max_steps=2",
              "train.checkpoint_every=100", "eval.max_new_tokens=12", "eval.diagnostics=false"]
    run = tmp_path / "run"
    assert runner.invoke(app, ["build-queues", "-q", *common]).exit_code == 0
    for stage in ("st", "lm", "adapter"):
        result = runner.invoke(app, ["train-stage", stage, "--run-dir", str(run), "-q", *common])
        assert result.exit_code == 0, (stage, result.output)
    result = runner.invoke(app, ["evaluate", "scienceqa", "--run-dir", str(run), "--stage", "adapter"])
    assert result.exit_code == 0, result.output
    out = run / "eval/adapter-scienceqa"
    metrics = json.loads((out / "metrics.json").read_text())
    official = metrics["official"]
    test_ids = json.loads((sqa["data"] / "pid_splits.json").read_text())["test"]
    results = json.loads((out / "results.json").read_text())["results"]
    assert sorted(results) == sorted(test_ids)                               # one official index per test problem
    assert all(isinstance(v, int) for v in results.values())
    for key in ("acc_natural", "acc_social", "acc_language", "acc_has_text", "acc_has_image", "acc_no_context",
                "acc_grade_1_6", "acc_grade_7_12", "acc_average"):
        assert key in official
    assert metrics["parse_failures"] <= len(test_ids) and "always_a" in json.dumps(metrics["controls"]).lower()
    assert "Avg" in result.output or "average" in result.output.lower()
    zeroed = runner.invoke(app, ["evaluate", "scienceqa", "--run-dir", str(run), "--stage", "adapter", "-q",
                                 "eval.zero_images=true"])
    assert zeroed.exit_code == 0, zeroed.output
    assert (run / "eval/adapter-scienceqa-zero-images/metrics.json").is_file()
    assert json.loads((run / "eval/adapter-scienceqa-zero-images/metrics.json").read_text())["zero_images"] is True
