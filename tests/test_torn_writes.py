"""No torn artifacts: a write that fails at any point leaves valid checkpoints and manifests, and a rerun completes.

Every write of a tiny stage (safetensors, torch.save, os.replace) is made to fail in turn with
ENOSPC; a half-written queue part or Parquet file is detected and rebuilt.
"""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import eimctl.runtime.weights as weights_io
import eimctl.train.checkpoint as checkpoint
from eimctl.eim.queues import queue_folder
from eimctl.train.checkpoint import list_checkpoints, load_state
from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.captions import read_split
from eimctl.runtime.rundir import outputs_intact, read_manifest

runner = CliRunner()


class FailingWrites:
    """Counts writes; the `fail_at`-th raises OSError(ENOSPC) (0 = never fail)."""

    def __init__(self, monkeypatch, fail_at: int = 0):
        self.calls, self.fail_at = 0, fail_at
        real_replace, real_save_file, real_torch_save = os.replace, weights_io.save_file, torch.save

        def counted(real):
            def wrapper(*args, **kwargs):
                self.calls += 1
                if self.calls == self.fail_at:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(*args, **kwargs)
            return wrapper

        monkeypatch.setattr(os, "replace", counted(real_replace))
        monkeypatch.setattr(weights_io, "save_file", counted(real_save_file))
        monkeypatch.setattr(torch, "save", counted(real_torch_save))


def assert_nothing_torn(stage: Path) -> None:
    manifest = read_manifest(stage)
    if manifest is not None:
        assert manifest["status"] == "complete" and outputs_intact(stage, manifest) == []
    for folder in list_checkpoints(stage / "checkpoints"):     # every checkpoint offered for resume loads
        assert load_state(folder)["step"] == int(folder.name.split("-")[1])
        assert load_file(folder / checkpoint.WEIGHTS)
    assert not [p for p in stage.rglob("*") if p.name.endswith(".tmp") and p.is_file()]


def test_failed_write_at_every_point_leaves_nothing_torn(tmp_path: Path, tiny_overrides, monkeypatch):
    overrides = [*tiny_overrides, "train.epochs=1"]          # 6 steps, checkpoints at 2 and 4

    def train(run: Path):
        return runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *overrides])

    with monkeypatch.context() as patch:
        counter = FailingWrites(patch)
        assert train(tmp_path / "straight").exit_code == 0
    writes = counter.calls
    assert writes >= 13  # config, feature cache, 2 checkpoints (4 each), final weights (2), manifest
    reference = load_file(tmp_path / "straight/stages/base/final/trainable.safetensors")
    for k in range(1, writes + 1):
        run = tmp_path / f"k{k}"
        with monkeypatch.context() as patch:
            FailingWrites(patch, fail_at=k)
            failed = train(run)
        assert failed.exit_code == 1, (k, failed.output)
        assert failed.output.startswith("Error: disk full while writing") and failed.output.count("\n") == 1
        stage = run / "stages/base"
        assert not (stage / "manifest.json").exists()            # the manifest is the last write
        assert_nothing_torn(stage)
        rerun = train(run)                                    # resumes from what was kept
        assert rerun.exit_code == 0, (k, rerun.output)
        assert_nothing_torn(stage)
        final = load_file(stage / "final/trainable.safetensors")
        assert max((final[n] - reference[n]).abs().max().item() for n in reference) <= 1e-4, k


def test_half_written_queue_files_are_detected_and_rebuilt(tmp_path: Path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("EIMCTL_QUEUE_PART_ROWS", "16")
    args = ["build-queues", "-q", *tiny_overrides, f"eim.queues_dir={tmp_path / 'q'}"]
    assert runner.invoke(app, args).exit_code == 0
    config = load_config(None, [*tiny_overrides, f"eim.queues_dir={tmp_path / 'q'}"])
    folder = queue_folder(config, read_split(config.data, "train"))
    original = pq.read_table(folder / "kt.parquet").column("key").to_pylist()

    # A Parquet file cut in half: the manifest no longer matches, the file is rebuilt.
    data = (folder / "kt.parquet").read_bytes()
    (folder / "kt.parquet").write_bytes(data[: len(data) // 2])
    assert outputs_intact(folder, read_manifest(folder)) == ["kt.parquet"]
    assert runner.invoke(app, args).exit_code == 0
    assert pq.read_table(folder / "kt.parquet").column("key").to_pylist() == original
    assert outputs_intact(folder, read_manifest(folder)) == []

    # A half-written part from an interrupted build: reported in one line and removed; the rerun rebuilds it.
    (folder / "kt.parquet").unlink()
    (folder / ".parts").mkdir()
    part = folder / ".parts/kt-00000.npy"
    with open(part, "wb") as handle:
        np.save(handle, np.zeros((16, 24), np.float32))
    part.write_bytes(part.read_bytes()[:200])
    failed = runner.invoke(app, args)
    assert failed.exit_code == 1 and failed.output.startswith("Error: queue part is damaged: kt-00000.npy")
    assert not part.exists() and read_manifest(folder) is None
    assert runner.invoke(app, args).exit_code == 0
    assert pq.read_table(folder / "kt.parquet").column("key").to_pylist() == original
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"
