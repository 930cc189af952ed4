"""SIGTERM during a build made of parts (`build-queues`, the frozen-CLIP feature cache): the current part is
finished, one line says how many parts are kept, exit code 128 + signal; rerunning the same command continues
from the kept parts and ends bit-identical to an uninterrupted build."""
import re
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.cli import app
from test_interrupt import _signal_when

runner = CliRunner()
LINE = re.compile(r"^Interrupted by SIGTERM while (.+) \((\d+) of (\d+) parts done\): finished parts are kept; "
                  r"rerun the same command to continue$")


def _one_line(code: int, stderr: str) -> re.Match:
    assert code == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    match = LINE.match(lines[0])
    assert match, lines[0]
    return match


def test_sigterm_during_build_queues_keeps_parts_and_the_rerun_matches(tmp_path: Path, tiny_overrides,
                                                                       monkeypatch):
    monkeypatch.setenv("EIMCTL_QUEUE_PART_ROWS", "4")   # 48 rows -> 12 parts per queue
    straight = runner.invoke(app, ["build-queues", "-q", *tiny_overrides, f"eim.queues_dir={tmp_path / 'a'}"])
    assert straight.exit_code == 0, straight.output
    [folder_a] = (tmp_path / "a").iterdir()
    folder_b = tmp_path / "b" / folder_a.name
    args = ["build-queues", "-q", *tiny_overrides, f"eim.queues_dir={tmp_path / 'b'}"]
    code, stderr = _signal_when([sys.executable, "-m", "eimctl", *args],
                                lambda: len(list(folder_b.glob(".parts/kt-*.npy"))) >= 2, [signal.SIGTERM], "0.2")
    match = _one_line(code, stderr)
    assert match[1] == "building the kt queue" and int(match[3]) == 12
    kept = len(list(folder_b.glob(".parts/kt-*.npy")))
    assert 2 <= int(match[2]) == kept < 12
    assert not (folder_b / "manifest.json").exists() and not (folder_b / "kt.parquet").exists()
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert not (folder_b / ".parts").exists()
    for name in ("kt", "ke", "kb"):
        a, b = pq.read_table(folder_a / f"{name}.parquet"), pq.read_table(folder_b / f"{name}.parquet")
        assert a.equals(b), name


def test_sigterm_while_encoding_features_keeps_parts_and_the_rerun_matches(tmp_path: Path, tiny_overrides,
                                                                           monkeypatch):
    monkeypatch.setenv("EIMCTL_FEATURE_PART_IMAGES", "2")   # 24 training images -> 12 parts
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    args = ["train-stage", "base", "-q", *tiny_overrides]
    assert runner.invoke(app, [*args, "--run-dir", str(straight)]).exit_code == 0
    parts = cut / "cache"

    def kept() -> int:
        return len(list(parts.glob("features-train-*.parts/*.npy")))
    code, stderr = _signal_when([sys.executable, "-m", "eimctl", *args, "--run-dir", str(cut)],
                                lambda: kept() >= 3, [signal.SIGTERM], "0.2")
    match = _one_line(code, stderr)
    assert match[1] == "encoding train images" and int(match[3]) == 12
    assert 3 <= int(match[2]) == kept() < 12
    assert not list(parts.glob("features-train-*.npy"))
    assert not (cut / "stages/base/manifest.json").exists()
    rerun = runner.invoke(app, [*args, "--run-dir", str(cut)])
    assert rerun.exit_code == 0, rerun.output
    assert not list(parts.glob("*.parts"))
    [a_cache] = (straight / "cache").glob("features-train-*.npy")
    [b_cache] = parts.glob("features-train-*.npy")
    assert a_cache.read_bytes() == b_cache.read_bytes()
    a = load_file(straight / "stages/base/final/trainable.safetensors")
    b = load_file(cut / "stages/base/final/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
