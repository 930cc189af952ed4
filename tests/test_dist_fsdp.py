"""dist.strategy=fsdp (FSDP2 over the LM blocks and the stage objective) on torchrun ranks (gloo on CPU) against
one process, and its checkpoints: sharded (torch.distributed.checkpoint) and full, each resumed at another
world size. Global batch 6 over the tiny data's 48 samples (8 steps; 6 splits over 1, 2 or 3 ranks); the tiny
LM has dropout 0, as in tests/test_dist_train.py.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import tiny
from eimctl.cli import app

pytestmark = pytest.mark.distributed
runner = CliRunner()
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-4
FSDP = ["dist.strategy=fsdp"]
SHARDED = [*FSDP, "dist.checkpoint_format=sharded"]


@pytest.fixture(scope="module")
def overrides(tiny_assets, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("dist-fsdp")
    lm = tiny.make_tiny_lm(root / "lm-no-dropout", dropout=0.0)
    return [f"model.clip.name={tiny_assets['clip']}", "model.clip.pretrained=", f"model.lm.name={lm}",
            f"data.path={tiny_assets['data']}", f"eim.queues_dir={root / 'queues'}",
            "model.clip.remove_projection=true", "model.clip.tokens=full", "model.projector.type=ffn",
            "eim.prompt_tokens=2", "train.epochs=1", "train.warmup_steps=2", "train.lr=1e-3", "train.log_every=1",
            "train.checkpoint_every=2", "eval.diagnostics=false", "train.batch_size=6", "train.max_grad_norm=1.0"]


@pytest.fixture(scope="module")
def straight(overrides, tmp_path_factory) -> Path:
    """The uninterrupted one-process run every test compares with."""
    run = tmp_path_factory.mktemp("fsdp-straight") / "run"
    plain("train-stage", "base", "--run-dir", str(run), "-q", *overrides)
    return run


def torchrun(n: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "eimctl.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def plain(*args: str):
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


def crashed_at_step_3(n: int, run: Path, args: list[str]) -> Path:
    """A run killed after step 3 on `n` ranks; returns the checkpoint it left (step 2)."""
    crashed = torchrun(n, "train-stage", "base", "--run-dir", str(run), "-q", *args,
                       env={"EIMCTL_TEST_CRASH_AT_STEP": "3"})
    assert crashed.returncode != 0
    folder = run / "stages/base/checkpoints/step-000002"
    assert folder.is_dir() and not list(folder.parent.glob(".*.tmp"))
    return folder


def resumed_equals_straight(run: Path, straight: Path, n: int, args: list[str], what: str) -> None:
    """Resume on `n` ranks (0: one plain process); every step logged once, weights as uninterrupted."""
    if n:
        resumed = torchrun(n, "train-stage", "base", "--run-dir", str(run), "-q", *args)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    else:
        plain("train-stage", "base", "--run-dir", str(run), "-q", *args)
    steps = [m["step"] for m in metrics(run)]
    assert steps == list(range(1, 9))
    weights = weight_diff(straight, run)
    print(f"\n{what} -> {n or 1} process(es): max |weight diff| vs uninterrupted {weights:.3g}")
    assert weights <= WEIGHT_TOLERANCE


def test_fsdp_on_two_ranks_equals_one_process(overrides, straight, tmp_path):
    """With micro-batches of 1 (gradient sync on the last only) and clipping on DTensor gradients."""
    many = tmp_path / "fsdp"
    launched = torchrun(2, "train-stage", "base", "--run-dir", str(many), "-q", *overrides, *FSDP,
                        "train.micro_batch_size=1")
    assert launched.returncode == 0, launched.stderr[-3000:]
    losses, weights = loss_diff(straight, many), weight_diff(straight, many)
    print(f"\nfsdp 2 ranks vs 1 process: max |loss diff| {losses:.3g}, max |weight diff| {weights:.3g}")
    assert losses <= LOSS_TOLERANCE and weights <= WEIGHT_TOLERANCE
    manifest = json.loads((many / "stages/base/manifest.json").read_text())
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["strategy"] == "fsdp"


def test_sharded_checkpoint_resumes_on_three_ranks_and_on_one_process(overrides, straight, tmp_path):
    args = [*overrides, *SHARDED]
    folder = crashed_at_step_3(2, tmp_path / "three", args)
    assert sorted(p.name for p in folder.iterdir()) == ["dcp", "trainer_state.pt"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (folder / "dcp").iterdir()}
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    assert state["checkpoint_format"] == "sharded" and state["world_size"] == 2 and "optimizer" not in state
    shutil.copytree(tmp_path / "three", tmp_path / "one")
    resumed_equals_straight(tmp_path / "three", straight, 3, args, "sharded checkpoint from 2 ranks")
    resumed_equals_straight(tmp_path / "one", straight, 0, args, "sharded checkpoint from 2 ranks")


def test_full_checkpoint_under_fsdp_resumes_sharded_on_three_ranks_and_on_one_process(overrides, straight,
                                                                                       tmp_path):
    args = [*overrides, *FSDP]
    folder = crashed_at_step_3(2, tmp_path / "three", args)
    plain_names = set(load_file(straight / "stages/base/final/trainable.safetensors"))
    trainable = load_file(folder / "trainable.safetensors")
    assert set(trainable) <= plain_names and all("model." not in name for name in trainable)
    optimizer = torch.load(folder / "trainer_state.pt", weights_only=True)["optimizer"]
    assert sorted(optimizer["state"]) == list(range(len(trainable)))  # numbered as a plain run numbers it
    shutil.copytree(tmp_path / "three", tmp_path / "one")
    resumed_equals_straight(tmp_path / "three", straight, 3, args, "full fsdp checkpoint from 2 ranks")
    resumed_equals_straight(tmp_path / "one", straight, 0, [*overrides], "full fsdp checkpoint from 2 ranks")


def test_sharded_checkpoints_without_fsdp_are_refused(overrides, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *overrides,
                                 "dist.checkpoint_format=sharded"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "dist.checkpoint_format=sharded needs dist.strategy=fsdp" in errors[0], result.output
    assert not (run / "stages" / "base").exists() or not any((run / "stages" / "base").iterdir())
