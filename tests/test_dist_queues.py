"""Sharded `build-queues`: 2 torchrun ranks (gloo on CPU), `--shard I/N` job arrays, and builds stopped at one
world size and finished at another all give the keys of a plain 1-process build, bit for bit.

Each torchrun launch costs ~10 s (imports), so the file launches it three times and does the rest in-process.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from eimctl.cli import app

pytestmark = pytest.mark.distributed
runner = CliRunner()
QUEUES = ("kt", "ke", "kb")
ENV = {"EIMCTL_QUEUE_PART_ROWS": "4", "OMP_NUM_THREADS": "1"}   # 48 rows -> 12 parts per queue


@pytest.fixture(scope="module")
def overrides(tiny_assets) -> list[str]:
    """The tiny models and data; keys stored as float32, so float16 rounding cannot hide a difference."""
    return [f"model.clip.name={tiny_assets['clip']}", "model.clip.pretrained=", f"model.lm.name={tiny_assets['lm']}",
            f"data.path={tiny_assets['data']}", "eim.queue_dtype=float32"]


def _plain(store: Path, overrides: list[str], *extra: str, env: dict | None = None):
    """`eimctl build-queues` in this process (one process, no launcher)."""
    return runner.invoke(app, ["build-queues", *extra, *overrides, f"eim.queues_dir={store}"],
                         env={**ENV, **(env or {})})


def _torchrun(store: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "eimctl.cli", "build-queues", *overrides, f"eim.queues_dir={store}"]


def _folder(store: Path) -> Path:
    [folder] = store.iterdir()
    return folder


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory) -> Path:
    """The queues of an uninterrupted 1-process build."""
    store = tmp_path_factory.mktemp("reference")
    result = _plain(store, overrides, "-q")
    assert result.exit_code == 0, result.output
    return _folder(store)


def assert_same_queues(a: Path, b: Path) -> None:
    """Bitwise the same keys (Parquet and sidecar), sample ids, Parquet metadata and manifest fingerprints."""
    for name in QUEUES:
        ta, tb = pq.read_table(a / f"{name}.parquet"), pq.read_table(b / f"{name}.parquet")
        assert ta.equals(tb), name
        assert ta.schema.metadata == tb.schema.metadata, name
        keys_a = np.stack(ta.column("key").to_numpy(zero_copy_only=False))
        keys_b = np.stack(tb.column("key").to_numpy(zero_copy_only=False))
        assert np.array_equal(keys_a, keys_b), name
        assert np.array_equal(np.load(a / f"{name}.parquet.keys.npy"), np.load(b / f"{name}.parquet.keys.npy")), name
    ma, mb = (json.loads((folder / "manifest.json").read_text()) for folder in (a, b))
    assert ma["status"] == mb["status"] == "complete"
    assert ma["fingerprints"] == mb["fingerprints"] and ma["dims"] == mb["dims"]
    assert not (b / ".parts").exists()


def _parts(folder: Path, name: str = "*") -> list[str]:
    return sorted(p.name for p in folder.glob(f".parts/{name}-*.npy"))


def test_two_ranks_build_the_same_queues_as_one_process(tmp_path, overrides, reference):
    done = subprocess.run(_torchrun(tmp_path, overrides), env={**os.environ, **ENV}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_queues(reference, _folder(tmp_path))
    assert done.stdout.count("key queues (48 rows") == 1          # only rank 0 prints
    ran = {json.loads((folder / "manifest.json").read_text())["distributed"]["world_size"]
           for folder in (reference, _folder(tmp_path))}
    assert ran == {1, 2}                                          # the manifest says how it was built


def test_shards_then_the_plain_command_equal_one_process(tmp_path, overrides, reference):
    for index in (0, 1):
        result = _plain(tmp_path, overrides, "--shard", f"{index}/2")
        assert result.exit_code == 0, result.output
        last = result.output.strip().splitlines()[-1]
        assert re.fullmatch(rf"shard {index}/2: 18 parts built; run eimctl build-queues .*eim\.queues_dir=\S+ "
                            r"to assemble", last), last
    folder = _folder(tmp_path)
    assert len(_parts(folder)) == 36 and not list(folder.glob("*.parquet")) and not (folder / "manifest.json").exists()
    again = _plain(tmp_path, overrides, "-q", "--shard", "1/2")          # nothing left to do for shard 1
    assert again.exit_code == 0 and len(_parts(folder)) == 36
    result = _plain(tmp_path, overrides, "-q")
    assert result.exit_code == 0, result.output
    assert_same_queues(reference, folder)


def _killpg_when(command: list[str], ready, env: dict, timeout: float = 240.0) -> int:
    """Start `command` (torchrun and its workers) in a session of its own; SIGKILL all of it once `ready()`."""
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=30)
    return process.returncode


def test_two_rank_build_killed_part_way_is_finished_by_one_process(tmp_path, overrides, reference):
    folder = tmp_path / reference.name
    code = _killpg_when(_torchrun(tmp_path, overrides), lambda: len(_parts(folder, "ke")) >= 3,
                        {**ENV, "EIMCTL_TEST_STEP_DELAY": "0.2"})
    assert code == -signal.SIGKILL
    assert not (folder / "manifest.json").exists()
    assert 3 <= len(_parts(folder, "ke")) < 12 and not _parts(folder, "kb")
    _wait_until_the_lock_holder_is_gone(folder)  # SIGKILL is delivered, but rank 0 may take a moment to die
    result = _plain(tmp_path, overrides, "-q")
    assert result.exit_code == 0, result.output
    assert_same_queues(reference, folder)


def _wait_until_the_lock_holder_is_gone(folder: Path, timeout: float = 20.0) -> None:
    from eimctl.runtime.locks import _pid_alive

    lock = folder / ".lock"
    pid = json.loads(lock.read_text())["pid"] if lock.is_file() else None
    deadline = time.time() + timeout
    while pid is not None and _pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)


def test_one_process_stopped_part_way_is_finished_by_two_ranks(tmp_path, overrides, reference):
    shard = _plain(tmp_path, overrides, "-q", "--shard", "0/3")      # parts 0, 3, 6, 9 of each queue
    assert shard.exit_code == 0, shard.output
    folder = _folder(tmp_path)
    assert _parts(folder, "kt") == [f"kt-{n:05d}.npy" for n in (0, 3, 6, 9)]
    done = subprocess.run(_torchrun(tmp_path, overrides), env={**os.environ, **ENV}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_queues(reference, folder)


def _one_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_plan_from_another_build_is_refused(tmp_path, overrides):
    assert _plain(tmp_path, overrides, "-q", "--shard", "0/2").exit_code == 0
    folder = _folder(tmp_path)
    plan_path = folder / ".parts/plan.json"
    plan = json.loads(plan_path.read_text())
    assert plan == {"format": 1, "rows": 48, "part_rows": 4, "queues": list(QUEUES),
                    "queue_fingerprint": folder.name.rsplit("-", 1)[1]}
    before = _parts(folder)

    line = _one_error(_plain(tmp_path, overrides, "-q", env={"EIMCTL_QUEUE_PART_ROWS": "16"}))
    assert "queue parts on disk were planned for another build: part_rows 4, not 16" in line
    plan_path.write_text(json.dumps({**plan, "queue_fingerprint": "0" * 16}))          # a foreign plan
    line = _one_error(_plain(tmp_path, overrides, "-q", "--shard", "1/2"))
    assert f"queue_fingerprint '{'0' * 16}', not '{plan['queue_fingerprint']}'" in line and "plan.json" in line
    assert _parts(folder) == before and not (folder / "manifest.json").exists()


@pytest.mark.parametrize("shard", ["2/2", "1/1", "0/0", "a/b", "3", "-1/2", "1/2/3", ""])
def test_bad_shard_values_are_one_error_line(tmp_path, overrides, shard):
    line = _one_error(_plain(tmp_path, overrides, "-q", "--shard", shard))
    assert line.startswith(f"Error: --shard must be I/N with N >= 1 and 0 <= I < N (e.g. 0/8), not {shard!r}")
    assert not list(tmp_path.iterdir())


def test_force_with_shard_is_refused(tmp_path, overrides):
    line = _one_error(_plain(tmp_path, overrides, "-q", "--force", "--shard", "0/2"))
    assert "--force cannot be combined with --shard" in line
