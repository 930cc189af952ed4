"""What the many-process tests share: the tiny overrides with a dropout-free LM, torchrun and plain launches of the
CLI, and comparisons of two runs' logged losses and final weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file
from typer.testing import CliRunner

import tiny
from eimctl.cli import app

runner = CliRunner()
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-4


def dist_overrides(tiny_assets: dict, root: Path) -> list[str]:
    """The tiny EIM setup; its GPT-2 has dropout 0, because dropout masks cannot agree across shardings."""
    lm = tiny.make_tiny_lm(root / "lm-no-dropout", dropout=0.0)
    return [f"model.clip.name={tiny_assets['clip']}", "model.clip.pretrained=", f"model.lm.name={lm}",
            f"data.path={tiny_assets['data']}", f"eim.queues_dir={root / 'queues'}",
            "model.clip.remove_projection=true", "model.clip.tokens=full", "model.projector.type=ffn",
            "eim.prompt_tokens=2", "train.epochs=1", "train.warmup_steps=2", "train.lr=1e-3", "train.log_every=1",
            "train.checkpoint_every=2", "eval.diagnostics=false"]


def torchrun(n: int, *args: str, env: dict | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    """`eimctl ARGS` on `n` gloo ranks (torchrun --standalone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               *(["--max-restarts", str(restarts)] if restarts else []), "-m", "eimctl.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def plain(*args: str):
    """`eimctl ARGS` in this process; it must succeed."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def metrics(run: Path, stage: str = "base") -> list[dict]:
    return [json.loads(line) for line in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


def weight_diff(one: Path, many: Path, stage: str = "base") -> float:
    """max |weight diff| of the final weights, which must have the same names and shapes."""
    wa = load_file(one / "stages" / stage / "final/trainable.safetensors")
    wb = load_file(many / "stages" / stage / "final/trainable.safetensors")
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def loss_diff(one: Path, many: Path, stage: str = "base") -> float:
    """max |loss diff| over every logged loss; steps, epochs and lr must be equal."""
    a, b = metrics(one, stage), metrics(many, stage)
    assert [(m["step"], m["epoch"], m["lr"]) for m in a] == [(m["step"], m["epoch"], m["lr"]) for m in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if k.startswith("loss"))
