"""Resume parity under real SIGKILL: a killed `train-stage` / `build-queues` rerun matches an uninterrupted one.

Kill points are random but seeded: after the N-th metrics line (training), after the K-th queue
part (queue build), and inside `save_checkpoint` between its files and the rename (fault hook
EIMCTL_TEST_CRASH_IN_CHECKPOINT). EIMCTL_TEST_STEP_DELAY slows steps so the kill lands mid-run.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.runtime.rundir import outputs_intact, read_manifest

runner = CliRunner()
SEED = 20260426
STAGE = "stages/base"


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "eimctl.cli", *args]


def _kill_when(command: list[str], ready, env: dict, timeout: float = 120.0) -> int:
    """Start `command`, SIGKILL it as soon as `ready()` is true; returns its exit code."""
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=30)
    return process.returncode


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / STAGE / "metrics.jsonl").read_text().splitlines()]


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def weight_and_loss_diff(straight: Path, cut: Path) -> tuple[float, float]:
    a = load_file(straight / STAGE / "final/trainable.safetensors")
    b = load_file(cut / STAGE / "final/trainable.safetensors")
    assert a.keys() == b.keys()
    weights = max((a[k] - b[k]).abs().max().item() for k in a)
    ma, mb = _metrics(straight), _metrics(cut)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    losses = max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb))
    return weights, losses


def test_train_stage_survives_sigkill_and_torn_checkpoints(tmp_path: Path, tiny_overrides):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert runner.invoke(app, ["train-stage", "base", "--run-dir", str(straight), "-q", *tiny_overrides]).exit_code == 0
    command = _command("train-stage", "base", "--run-dir", str(cut), "-q", *tiny_overrides)
    checkpoints = cut / STAGE / "checkpoints"

    # 1. SIGKILL inside save_checkpoint of step 4 (seeded: after its weights file, or with both files
    #    written but before the rename): a torn temporary folder, step-000002 the last complete one.
    rng = random.Random(SEED)
    point = rng.choice(["weights", "rename"])
    killed = subprocess.run(command, env={**os.environ, "EIMCTL_TEST_CRASH_IN_CHECKPOINT": f"4:{point}"},
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["step-000002"]
    assert not (cut / STAGE / "manifest.json").exists()

    # 2. Resume; an outside SIGKILL after a seeded number of metrics lines.
    kill_after = rng.randint(5, 10)
    code = _kill_when(command, lambda: _lines(cut / STAGE / "metrics.jsonl") >= kill_after,
                      {"EIMCTL_TEST_STEP_DELAY": "0.05"})
    assert code == -signal.SIGKILL
    assert not (cut / STAGE / "manifest.json").exists()

    # 3. Resume to the end (in-process): same weights and logged losses as the uninterrupted run.
    resumed = runner.invoke(app, ["train-stage", "base", "--run-dir", str(cut), "-q", "--resume", "auto",
                                  *tiny_overrides])
    assert resumed.exit_code == 0, resumed.output
    manifest = read_manifest(cut / STAGE)
    assert manifest["status"] == "complete" and outputs_intact(cut / STAGE, manifest) == []
    weights, losses = weight_and_loss_diff(straight, cut)
    print(f"\nresume parity after kills in checkpoint 4 ({point}) and after metrics line {kill_after}: "
          f"max |weight diff| {weights:.3g}, max |loss diff| {losses:.3g}")
    assert weights <= 1e-4 and losses <= 1e-4


def _queue_keys(folder: Path) -> dict:
    keys = {}
    for name in ("kt", "ke", "kb"):
        table = pq.read_table(folder / f"{name}.parquet")
        keys[name] = (table.column("sample_id").to_pylist(), table.column("index").to_pylist(),
                      np.stack(table.column("key").to_numpy(zero_copy_only=False)).astype(np.float32))
    return keys


def test_build_queues_survives_sigkill(tmp_path: Path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("EIMCTL_QUEUE_PART_ROWS", "4")   # 48 rows -> 12 parts per queue
    straight = runner.invoke(app, ["build-queues", "-q", *tiny_overrides, f"eim.queues_dir={tmp_path / 'a'}"])
    assert straight.exit_code == 0, straight.output
    [folder_a] = (tmp_path / "a").iterdir()

    command = _command("build-queues", "-q", *tiny_overrides, f"eim.queues_dir={tmp_path / 'b'}")
    folder_b = tmp_path / "b" / folder_a.name
    rng = random.Random(SEED)
    queue, kill_after = rng.choice(["kt", "ke", "kb"]), rng.randint(2, 10)   # of that queue's 12 parts

    def parts_done() -> bool:
        return len(list(folder_b.glob(f".parts/{queue}-*.npy"))) >= kill_after

    code = _kill_when(command, parts_done, {"EIMCTL_TEST_STEP_DELAY": "0.05"})
    assert code == -signal.SIGKILL
    assert not (folder_b / "manifest.json").exists()
    kept = len(list(folder_b.glob(f".parts/{queue}-*.npy")))
    assert kill_after <= kept < 12                       # killed mid-queue; finished parts are kept
    rerun = runner.invoke(app, ["build-queues", "-q", *tiny_overrides, f"eim.queues_dir={tmp_path / 'b'}"])
    assert rerun.exit_code == 0, rerun.output
    assert not (folder_b / ".parts").exists()
    a, b = _queue_keys(folder_a), _queue_keys(folder_b)
    for name in a:
        assert a[name][0] == b[name][0] and a[name][1] == b[name][1]     # sample ids and index, in order
    diff = max(float(np.abs(a[name][2] - b[name][2]).max()) for name in a)
    print(f"\nqueue build killed after {kept} of 12 {queue} parts; max |key diff| vs uninterrupted {diff:.3g}")
    assert diff <= 1e-4
