"""Training under torchrun (2 gloo ranks on CPU) against one process on the same global batch.

Each rank takes a strided share of the global batch and scales its losses to their part of the global
mean, so the logged losses agree to float rounding and the weights to accumulated rounding; a 1-rank
torchrun takes the plain path and is bit for bit a plain run. The tiny LM has dropout 0 here (dropout
masks cannot agree across shardings).
"""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from dist_helpers import (LOSS_TOLERANCE, WEIGHT_TOLERANCE, dist_overrides, loss_diff, metrics, plain, torchrun,
                          weight_diff)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def overrides(tiny_assets, tmp_path_factory) -> list[str]:
    return dist_overrides(tiny_assets, tmp_path_factory.mktemp("dist-train"))


@pytest.fixture(scope="module")
def straight(overrides, tmp_path_factory):
    """An uninterrupted one-process run (batch 8, 2 epochs: 12 steps) that the resume tests compare with."""
    run = tmp_path_factory.mktemp("dist-straight") / "run"
    plain("train-stage", "base", "--run-dir", str(run), "-q", *overrides, "train.batch_size=8", "train.epochs=2")
    return run


def compare(one, many, stage: str) -> tuple[float, float]:
    """(max |loss diff|, max |weight diff|) of a 1-process and a 2-rank run; same fingerprints, world sizes 1, 2."""
    losses, weights = loss_diff(one, many, stage), weight_diff(one, many, stage)
    ma, mb = (json.loads((run / "stages" / stage / "manifest.json").read_text()) for run in (one, many))
    assert ma["fingerprints"] == mb["fingerprints"]
    assert (ma["distributed"]["world_size"], mb["distributed"]["world_size"]) == (1, 2)
    return losses, weights


def test_every_stage_on_two_ranks_equals_one_process(overrides, tmp_path):
    """Batch 47 over 48 samples: global batches of 47 (shares of 24/23) and of 1, where rank 1 has no sample
    and runs a weightless copy of rank 0's."""
    args = [*overrides, "train.batch_size=47"]
    plain("build-queues", "-q", *args)
    one, many = tmp_path / "one", tmp_path / "many"
    for stage in ("base", "st", "lm", "base-ie"):
        plain("train-stage", stage, "--run-dir", str(one), "-q", *args)
        launched = torchrun(2, "train-stage", stage, "--run-dir", str(many), "-q", *args)
        assert launched.returncode == 0, launched.stderr[-3000:]
        losses, weights = compare(one, many, stage)
        print(f"\n{stage}: 2 ranks vs 1 process: max |loss diff| {losses:.3g}, max |weight diff| {weights:.3g}")
        assert losses <= LOSS_TOLERANCE and weights <= WEIGHT_TOLERANCE


def test_one_rank_torchrun_is_bit_identical_to_a_plain_run(overrides, tmp_path):
    args = [*overrides, "train.batch_size=9"]
    one, launched_dir = tmp_path / "one", tmp_path / "torchrun-1"
    plain("train-stage", "base", "--run-dir", str(one), "-q", *args)
    launched = torchrun(1, "train-stage", "base", "--run-dir", str(launched_dir), "-q", *args)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert [{k: v for k, v in m.items() if k not in ("elapsed_s", "samples_per_s")} for m in metrics(one, "base")] == \
        [{k: v for k, v in m.items() if k not in ("elapsed_s", "samples_per_s")} for m in metrics(launched_dir, "base")]
    wa = load_file(one / "stages/base/final/trainable.safetensors")
    wb = load_file(launched_dir / "stages/base/final/trainable.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_resume_from_one_process_on_two_ranks_and_from_two_ranks_in_one_process(overrides, straight, tmp_path):
    """One process killed after step 3 (checkpoint 2) -> resumed on 2 ranks, killed after step 7 (checkpoint 6)
    -> finished by one process: every step logged once, weights as the uninterrupted run's."""
    args = [*overrides, "train.batch_size=8", "train.epochs=2"]
    cut = tmp_path / "cut"
    crashed = subprocess.run([sys.executable, "-m", "eimctl.cli", "train-stage", "base", "--run-dir", str(cut), "-q",
                              *args], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "EIMCTL_TEST_CRASH_AT_STEP": "3"})
    assert crashed.returncode != 0 and (cut / "stages/base/checkpoints/step-000002").is_dir()
    on_two = torchrun(2, "train-stage", "base", "--run-dir", str(cut), "-q", *args,
                      env={"EIMCTL_TEST_CRASH_AT_STEP": "7"})
    assert on_two.returncode != 0 and (cut / "stages/base/checkpoints/step-000006").is_dir()
    assert [m["step"] for m in metrics(cut, "base")][-1] == 7  # it ran steps 3-7 on two ranks
    plain("train-stage", "base", "--run-dir", str(cut), "-q", *args)
    assert [m["step"] for m in metrics(cut, "base")] == list(range(1, 13))
    weights = weight_diff(straight, cut)
    print(f"\nresume 1 -> 2 -> 1 process(es): max |weight diff| vs uninterrupted {weights:.3g}")
    assert weights <= WEIGHT_TOLERANCE


def test_a_rank_that_dies_is_restarted_by_torchrun_and_the_stage_resumes(overrides, straight, tmp_path):
    """Rank 1 dies after step 3 (once); `torchrun --max-restarts 1` restarts both ranks, which resume from the
    step-2 checkpoint: one command completes, equal to an uninterrupted run."""
    args = [*overrides, "train.batch_size=8", "train.epochs=2"]
    cut = tmp_path / "cut"
    marker = tmp_path / "crashed-once"
    done = torchrun(2, "train-stage", "base", "--run-dir", str(cut), "-q", *args, restarts=1,
                    env={"EIMCTL_TEST_CRASH_AT_STEP": "3", "EIMCTL_TEST_CRASH_RANK": "1",
                         "EIMCTL_TEST_CRASH_ONCE": str(marker)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.exists()  # it did die once
    steps = [m["step"] for m in metrics(cut, "base")]
    assert steps == list(range(1, 13))
    assert weight_diff(straight, cut) <= WEIGHT_TOLERANCE


def test_a_run_directory_that_a_rank_cannot_see_is_refused(overrides, tmp_path):
    run = tmp_path / "run"
    launched = torchrun(2, "train-stage", "base", "--run-dir", str(run), "-q", *overrides,
                        env={"EIMCTL_TEST_UNSHARED_RANK": "1"})
    assert launched.returncode != 0
    assert "rank 1 on" in launched.stderr and "the run directory must be on a file system shared by all nodes" \
        in launched.stderr
    assert not (run / "stages" / "base").exists()
