"""Memory switches: `train.grad_checkpointing` (the same losses as without it, not fingerprinted) and
`model.lm.load_in_4bit` (one clear error where CUDA or bitsandbytes is missing)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.config import config_fingerprint, load_config
from eimctl.models.factory import build_model

runner = CliRunner()
WORDS = ["Image", ":", "N", "/", "A"]


@pytest.fixture(scope="module")
def lavin(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("switches")
    clip, lm = tiny.make_tiny_clip(root / "clip", layers=4), tiny.make_tiny_llama(root / "llama", words=WORDS)
    return [f"model.clip.name={clip}", "model.clip.pretrained=", f"model.lm.name={lm}", "model.family=lavin",
            "model.clip.tokens=cls_every_k", "model.clip.cls_every=2", "model.lavin.adapter_dropout=0.1",
            f"data.path={tiny.make_tiny_data(root / 'data', n_train=16)}", "train.batch_size=8",
            "train.warmup_steps=0", "train.lr=1e-2", "train.log_every=1", "train.max_steps=2",
            "eval.diagnostics=false", "train.feature_cache=false"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "stages/base/metrics.jsonl").read_text().splitlines()]


def test_gradient_checkpointing_gives_the_same_losses(lavin, tmp_path):
    """Dropout in the MMAs and the routing state the adapters keep between passes both survive recomputation."""
    for flag in ("false", "true"):
        result = runner.invoke(app, ["train-stage", "base", "--run-dir", str(tmp_path / flag), "-q", *lavin,
                                     f"train.grad_checkpointing={flag}"])
        assert result.exit_code == 0, result.output
    plain, checkpointed = losses(tmp_path / "false"), losses(tmp_path / "true")
    assert len(plain) == 2 and max(abs(a - b) for a, b in zip(plain, checkpointed)) <= 1e-6
    model, _ = build_model(load_config(overrides=lavin), groups={"st"}, losses={"base"})
    model.enable_gradient_checkpointing()
    assert all(layer.gradient_checkpointing for layer in model.lm.model.layers)
    on = load_config(overrides=[*lavin, "train.grad_checkpointing=true"])
    assert config_fingerprint(on) == config_fingerprint(load_config(overrides=lavin))   # a stage stays complete


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
                    reason="4-bit loading can run here")
def test_4bit_loading_without_cuda_or_bitsandbytes_is_one_clear_error(lavin, tmp_path):
    result = runner.invoke(app, ["train-stage", "base", "--run-dir", str(tmp_path), "-q", *lavin,
                                 "model.lm.load_in_4bit=true"])
    assert result.exit_code == 1
    assert "4-bit loading needs a CUDA GPU and the bitsandbytes package; set model.lm.load_in_4bit=false" \
        in result.output and result.output.count("Error:") == 1
