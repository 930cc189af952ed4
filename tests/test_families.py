"""The family protocol fits more than ClipCap: a second family (tests/skeleton_family.py, no prefix,
visual tokens added through a zero-init gate) builds, runs the paper's schedule through the real CLI
with the unchanged objectives, trains only its own groups, and equals the plain LM at initialisation."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.tokens import pad_batch, tokenize_pairs
from eimctl.eim.schedule import resolve_schedule, schedule_uses
from eimctl.models import registry
from eimctl.models.factory import build_model

runner = CliRunner()


@pytest.fixture
def skeleton(monkeypatch, tiny_overrides, tmp_path) -> list[str]:
    monkeypatch.setitem(registry.FAMILIES, "skeleton", "skeleton_family")   # the one registry line
    return tiny_overrides + ["model.family=skeleton", f"eim.queues_dir={tmp_path / 'queues'}",
                             "model.clip.remove_projection=true", "model.clip.tokens=full", "eim.prompt_tokens=2",
                             "train.max_steps=2"]


def test_a_second_family_runs_the_schedule_through_the_cli(skeleton, tmp_path: Path):
    run = tmp_path / "run"
    assert runner.invoke(app, ["build-queues", "-q", *skeleton]).exit_code == 0
    trained = {}
    for stage in ("st", "lm", "base-ie"):
        result = runner.invoke(app, ["train-stage", stage, "--run-dir", str(run), "-q", *skeleton])
        assert result.exit_code == 0, result.output
        trained[stage] = {name.split(".")[0] for name in load_file(run / f"stages/{stage}/final/trainable.safetensors")}
    # each stage saves everything trained so far, and nothing else: CLIP's own weights never train
    assert trained == {"st": {"st"}, "lm": {"st", "lm"}, "base-ie": {"st", "lm", "gate", "clip"}}
    losses = (run / "stages/base-ie/metrics.jsonl").read_text()
    assert "loss_base" in losses and "loss_ie" in losses


def test_the_skeleton_family_is_the_plain_lm_at_initialisation(skeleton):
    config = load_config(overrides=skeleton)
    groups, losses = schedule_uses(resolve_schedule(config))
    model, _ = build_model(config, groups=groups, losses=losses)
    model.eval()
    tokens, _ = tokenize_pairs(model.tokenizer, [("", "a red square"), ("", "the blue bar")], 40)
    batch = pad_batch(tokens, model.tokenizer.pad_token_id)
    visual = model.project(torch.randn(2, 17, 32))
    with torch.no_grad():
        gated = model.run_lm(visual, batch).logits
        plain = model.lm(input_ids=batch["input_ids"]).logits
        assert torch.equal(gated, plain)
        model.gate.fill_(0.5)
        assert not torch.allclose(model.run_lm(visual, batch).logits, plain)
