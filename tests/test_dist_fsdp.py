"""dist.strategy=fsdp (FSDP2 over the LM blocks and the stage objective) on torchrun ranks (gloo on CPU) against
one process, and its checkpoints: sharded (torch.distributed.checkpoint) and full, each resumed at another
world size. Global batch 6 over the tiny data's 48 samples (8 steps; 6 splits over 1, 2 or 3 ranks); the tiny
LM has dropout 0, as in tests/test_dist_train.py.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import (LOSS_TOLERANCE, WEIGHT_TOLERANCE, dist_overrides, loss_diff, metrics, plain, runner,
                          torchrun, weight_diff)
from eimctl.cli import app

pytestmark = pytest.mark.distributed
FSDP = ["dist.strategy=fsdp"]
SHARDED = [*FSDP, "dist.checkpoint_format=sharded"]


@pytest.fixture(scope="module")
def overrides(tiny_assets, tmp_path_factory) -> list[str]:
    return [*dist_overrides(tiny_assets, tmp_path_factory.mktemp("dist-fsdp")), "train.batch_size=6",
            "train.max_grad_norm=1.0"]


@pytest.fixture(scope="module")
def straight(overrides, tmp_path_factory) -> Path:
    """The uninterrupted one-process run every test compares with."""
    run = tmp_path_factory.mktemp("fsdp-straight") / "run"
    plain("train-stage", "base", "--run-dir", str(run), "-q", *overrides)
    return run


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


def test_full_checkpoint_under_fsdp_resumes_in_one_plain_process(overrides, straight,
                                                                                       tmp_path):
    args = [*overrides, *FSDP]
    folder = crashed_at_step_3(2, tmp_path / "three", args)
    plain_names = set(load_file(straight / "stages/base/final/trainable.safetensors"))
    trainable = load_file(folder / "trainable.safetensors")
    assert set(trainable) <= plain_names and all("model." not in name for name in trainable)
    optimizer = torch.load(folder / "trainer_state.pt", weights_only=True)["optimizer"]
    assert sorted(optimizer["state"]) == list(range(len(trainable)))  # numbered as a plain run numbers it
    resumed_equals_straight(tmp_path / "three", straight, 0, [*overrides], "full fsdp checkpoint from 2 ranks")


def test_sharded_checkpoints_without_fsdp_are_refused(overrides, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *overrides,
                                 "dist.checkpoint_format=sharded"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "dist.checkpoint_format=sharded needs dist.strategy=fsdp" in errors[0], result.output
    assert not (run / "stages" / "base").exists() or not any((run / "stages" / "base").iterdir())
