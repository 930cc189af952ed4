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
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

import tiny
from eimctl.cli import app

pytestmark = pytest.mark.distributed
runner = CliRunner()
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-4


@pytest.fixture(scope="module")
def overrides(tiny_assets, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("dist-train")
    lm = tiny.make_tiny_lm(root / "lm-no-dropout", dropout=0.0)
    return [f"model.clip.name={tiny_assets['clip']}", "model.clip.pretrained=", f"model.lm.name={lm}",
            f"data.path={tiny_assets['data']}", f"eim.queues_dir={root / 'queues'}",
            "model.clip.remove_projection=true", "model.clip.tokens=full", "model.projector.type=ffn",
            "eim.prompt_tokens=2", "train.epochs=1", "train.warmup_steps=2", "train.lr=1e-3", "train.log_every=1",
            "train.checkpoint_every=2", "eval.diagnostics=false"]


def torchrun(n: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "eimctl.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def plain(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


def compare(one: Path, many: Path, stage: str) -> tuple[float, float]:
    """(max |loss diff| over every logged loss, max |weight diff|); steps, epochs and lr must be equal."""
    a, b = metrics(one, stage), metrics(many, stage)
    assert [(m["step"], m["epoch"], m["lr"]) for m in a] == [(m["step"], m["epoch"], m["lr"]) for m in b]
    losses = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if k.startswith("loss"))
    wa = load_file(one / "stages" / stage / "final/trainable.safetensors")
    wb = load_file(many / "stages" / stage / "final/trainable.safetensors")
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    weights = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    ma, mb = (json.loads((run / "stages" / stage / "manifest.json").read_text()) for run in (one, many))
    assert ma["fingerprints"] == mb["fingerprints"]
    assert (ma["distributed"]["world_size"], mb["distributed"]["world_size"]) == (1, 2)
    return losses, weights


def test_every_stage_on_two_ranks_equals_one_process(overrides, tmp_path):
    """Batch 9 over 48 samples: shares of 5/4 and a last batch of 3 split 2/1."""
    args = [*overrides, "train.batch_size=9"]
    plain("build-queues", "-q", *args)
    one, many = tmp_path / "one", tmp_path / "many"
    for stage in ("base", "st", "lm", "base-ie"):
        plain("train-stage", stage, "--run-dir", str(one), "-q", *args)
        launched = torchrun(2, "train-stage", stage, "--run-dir", str(many), "-q", *args)
        assert launched.returncode == 0, launched.stderr[-3000:]
        losses, weights = compare(one, many, stage)
        print(f"\n{stage}: 2 ranks vs 1 process: max |loss diff| {losses:.3g}, max |weight diff| {weights:.3g}")
        assert losses <= LOSS_TOLERANCE and weights <= WEIGHT_TOLERANCE


def test_a_last_batch_smaller_than_the_world_pads_with_zero_weight(overrides, tmp_path):
    """Batch 47 over 48 samples: the last batch has 1 sample, so rank 1 runs a weightless copy."""
    args = [*overrides, "train.batch_size=47", "train.epochs=2"]
    one, many = tmp_path / "one", tmp_path / "many"
    plain("train-stage", "base", "--run-dir", str(one), "-q", *args)
    launched = torchrun(2, "train-stage", "base", "--run-dir", str(many), "-q", *args)
    assert launched.returncode == 0, launched.stderr[-3000:]
    losses, weights = compare(one, many, "base")
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


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(overrides, tmp_path, first, then):
    """Killed after step 3 (checkpoint at step 2) at one world size, resumed at the other."""
    args = [*overrides, "train.batch_size=8", "train.epochs=2"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    plain("train-stage", "base", "--run-dir", str(straight), "-q", *args)
    crashed = torchrun(first, "train-stage", "base", "--run-dir", str(cut), "-q", *args,
                       env={"EIMCTL_TEST_CRASH_AT_STEP": "3"})
    assert crashed.returncode != 0
    assert (cut / "stages/base/checkpoints/step-000002").is_dir()
    resumed = torchrun(then, "train-stage", "base", "--run-dir", str(cut), "-q", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [m["step"] for m in metrics(cut, "base")]
    assert steps == sorted(set(steps)) == list(range(1, 13))
    wa = load_file(straight / "stages/base/final/trainable.safetensors")
    wb = load_file(cut / "stages/base/final/trainable.safetensors")
    weights = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"\nresume {first} -> {then} ranks: max |weight diff| vs uninterrupted {weights:.3g}")
    assert weights <= WEIGHT_TOLERANCE


def test_a_global_batch_smaller_than_the_world_is_refused(overrides, tmp_path):
    launched = torchrun(2, "train-stage", "base", "--run-dir", str(tmp_path / "run"), "-q", *overrides,
                        "train.batch_size=1")
    assert launched.returncode != 0
    assert "train.batch_size=1 is smaller than the 2 processes launched" in launched.stderr
    assert not (tmp_path / "run" / "stages" / "base" / "manifest.json").exists()


def test_a_rank_that_dies_is_restarted_by_torchrun_and_the_stage_resumes(overrides, tmp_path):
    """Rank 1 dies after step 3 (once); `torchrun --max-restarts 1` restarts both ranks, which resume from the
    step-2 checkpoint: one command completes, equal to an uninterrupted run."""
    args = [*overrides, "train.batch_size=8", "train.epochs=2"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    plain("train-stage", "base", "--run-dir", str(straight), "-q", *args)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", "-m", "eimctl.cli", "train-stage", "base", "--run-dir", str(cut), "-q", *args]
    marker = tmp_path / "crashed-once"
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "EIMCTL_TEST_CRASH_AT_STEP": "3",
                               "EIMCTL_TEST_CRASH_RANK": "1", "EIMCTL_TEST_CRASH_ONCE": str(marker)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.exists()  # it did die once
    steps = [m["step"] for m in metrics(cut, "base")]
    assert steps == list(range(1, 13))
    wa = load_file(straight / "stages/base/final/trainable.safetensors")
    wb = load_file(cut / "stages/base/final/trainable.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= WEIGHT_TOLERANCE


def test_a_run_directory_that_a_rank_cannot_see_is_refused(overrides, tmp_path):
    run = tmp_path / "run"
    launched = torchrun(2, "train-stage", "base", "--run-dir", str(run), "-q", *overrides,
                        env={"EIMCTL_TEST_UNSHARED_RANK": "1"})
    assert launched.returncode != 0
    assert "rank 1 on" in launched.stderr and "the run directory must be on a file system shared by all nodes" \
        in launched.stderr
    assert not (run / "stages" / "base").exists()
