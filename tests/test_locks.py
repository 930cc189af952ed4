"""The folder lock: a live holder is refused with one line naming it, stale locks are taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eimctl.runtime import locks
from eimctl.runtime.errors import EimError
from eimctl.runtime.locks import hold_lock

HOLDER = """
import sys, time
from pathlib import Path
from eimctl.runtime.locks import hold_lock
with hold_lock(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID",
                 "TORCHELASTIC_RUN_ID", "EIMCTL_LOCK_HEARTBEAT_S", "EIMCTL_LOCK_STALE_S"):
        monkeypatch.delenv(name, raising=False)


def _write_lock(folder: Path, age_s: float = 0.0, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": locks._PID_NS,
              "started": "2026-11-28T21:00:03", "argv": ["eimctl"], "job": None, "token": "theirs"}
    record.update(fields)
    path.write_text(json.dumps(record), encoding="utf-8")
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lock_record(folder: Path) -> dict:
    return json.loads((folder / ".lock").read_text(encoding="utf-8"))


def test_a_live_holder_in_another_process_is_refused_then_taken_over_once_it_is_dead(tmp_path, capsys):
    folder = tmp_path / "runs" / "x" / "stages" / "st"
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "SLURM_JOB_ID": "123"}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(EimError) as caught:
            with hold_lock(folder, "stage 'st' in runs/x"):
                pytest.fail("the lock was granted while another process holds it")
        line = caught.value.line()
        assert f"stage 'st' in runs/x is in use by pid {child.pid} on {socket.gethostname()} since " in line
        assert "(job 123)" in line and str(folder.resolve() / ".lock") in line and "\n" not in line
        assert _lock_record(folder)["pid"] == child.pid          # the refused caller left it alone
    finally:
        child.kill()                                              # dies without removing its lock
        child.wait()
    with hold_lock(folder, "stage 'st' in runs/x"):
        assert _lock_record(folder)["pid"] == os.getpid()
    assert f"taking over a stale lock of pid {child.pid} (no longer running)" in capsys.readouterr().out
    assert not (folder / ".lock").exists()


def test_a_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid)
    with hold_lock(tmp_path, "queue store q"):
        record = _lock_record(tmp_path)
        assert record["pid"] == os.getpid() and record["token"] != "theirs"
        assert record["host"] == socket.gethostname() and record["argv"] == sys.argv
    assert f"taking over a stale lock of pid {pid} (no longer running)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # nothing left behind (no .stale-* file)


def test_another_hosts_lock_is_taken_over_only_without_a_recent_heartbeat(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EIMCTL_LOCK_STALE_S", "100")
    fresh = _write_lock(tmp_path / "fresh", age_s=10, host="node7", pid=4242, job="77")
    with pytest.raises(EimError) as caught:
        with hold_lock(tmp_path / "fresh", "stage 'st' in runs/x"):
            pytest.fail("a lock with a recent heartbeat was taken over")
    assert caught.value.line().startswith(
        "stage 'st' in runs/x is in use by pid 4242 on node7 since 2026-11-28T21:00:03 (job 77) — wait for it")
    assert _lock_record(fresh.parent)["token"] == "theirs"

    _write_lock(tmp_path / "old", age_s=1000, host="node7", pid=4242)
    with hold_lock(tmp_path / "old", "stage 'st' in runs/x"):
        assert _lock_record(tmp_path / "old")["pid"] == os.getpid()
    assert "taking over a stale lock of pid 4242 on node7" in capsys.readouterr().out
    assert not (tmp_path / "old" / ".lock").exists()


def test_the_lock_is_removed_after_the_block_and_after_an_exception(tmp_path):
    with hold_lock(tmp_path, "x"):
        assert _lock_record(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(ZeroDivisionError):
        with hold_lock(tmp_path, "x"):
            1 / 0
    assert not (tmp_path / ".lock").exists()
    with hold_lock(tmp_path, "x"):                               # and it can be taken again
        assert (tmp_path / ".lock").exists()


def test_a_lock_that_is_no_longer_ours_is_not_removed(tmp_path):
    with hold_lock(tmp_path, "x"):
        _write_lock(tmp_path, host="node7", pid=4242)           # someone judged ours stale and took it
    assert _lock_record(tmp_path)["token"] == "theirs"


def test_a_torn_lock_is_taken_over_when_old_and_refused_while_new(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_bytes(b"")
    with pytest.raises(EimError, match="is in use"):
        with hold_lock(tmp_path, "x"):
            pytest.fail("a lock being written was taken over")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with hold_lock(tmp_path, "x"):
        assert _lock_record(tmp_path)["pid"] == os.getpid()
    assert not lock.exists()


def test_the_heartbeat_touches_the_lock_while_held(tmp_path, monkeypatch):
    monkeypatch.setenv("EIMCTL_LOCK_HEARTBEAT_S", "0.05")
    with hold_lock(tmp_path, "x"):
        lock = tmp_path / ".lock"
        os.utime(lock, (time.time() - 1000, time.time() - 1000))
        deadline = time.time() + 5
        while time.time() - lock.stat().st_mtime > 100 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.stat().st_mtime < 100


def test_taking_the_same_lock_twice_in_one_process_does_not_deadlock(tmp_path):
    with hold_lock(tmp_path, "x"):
        with hold_lock(tmp_path / "sub" / "..", "x"):             # the same folder, spelled otherwise
            assert _lock_record(tmp_path)["pid"] == os.getpid()
        assert (tmp_path / ".lock").exists()                     # the inner exit leaves the outer's lock
    assert not (tmp_path / ".lock").exists()


def test_only_rank_0_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="node7", pid=4242)               # held by rank 0 of the same launch
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with hold_lock(tmp_path, "x"):
        assert _lock_record(tmp_path)["token"] == "theirs"
    assert _lock_record(tmp_path)["token"] == "theirs"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(EimError, match="in use by pid 4242 on node7"):
        with hold_lock(tmp_path, "x"):
            pass


def test_a_take_over_never_moves_a_lock_newer_than_the_one_judged_stale(tmp_path):
    stale = _write_lock(tmp_path, age_s=1000, host="node7", pid=4242)
    raw, _, stat = locks._read(stale)
    os.unlink(stale)                                            # meanwhile another process took it over
    _write_lock(tmp_path, host="node8", pid=5151, token="winner")
    assert locks._take_over(stale, raw, stat) is False
    assert _lock_record(tmp_path)["token"] == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_train_stage_and_build_queues_refuse_a_held_folder_and_take_over_a_stale_one(tmp_path, tiny_overrides):
    """Through the CLI: a live holder's lock stops the launch with one line and nothing written; the lock of a
    dead process is taken over and the stage trains."""
    from typer.testing import CliRunner

    from eimctl.cli import app
    from eimctl.config import load_config
    from eimctl.data.captions import read_split
    from eimctl.eim.queues import queue_folder

    runner, run = CliRunner(), tmp_path / "run"
    _write_lock(run / "stages" / "base", pid=os.getpid())  # this test process: alive
    refused = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *tiny_overrides])
    assert refused.exit_code == 1
    assert f"stage 'base' in {run} is in use by pid {os.getpid()}" in refused.output
    assert sorted(p.name for p in (run / "stages" / "base").iterdir()) == [".lock"]
    _write_lock(run / "stages" / "base", pid=_dead_pid())
    taken = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *tiny_overrides])
    assert taken.exit_code == 0, taken.output
    assert (run / "stages" / "base" / "manifest.json").is_file() and not (run / "stages" / "base" / ".lock").exists()

    queues = [*tiny_overrides, f"eim.queues_dir={tmp_path / 'queues'}"]
    config = load_config(overrides=queues)
    folder = queue_folder(config, read_split(config.data, "train"))
    _write_lock(folder, pid=os.getpid())
    refused = runner.invoke(app, ["build-queues", "-q", *queues])
    assert refused.exit_code == 1 and f"is in use by pid {os.getpid()}" in refused.output
    assert not (folder / "manifest.json").exists()


def test_a_zombie_holder_counts_as_dead(tmp_path):
    """A killed holder that nobody has reaped (common for torchrun's ranks in a container) holds nothing."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)   # exited, not yet waited for: a zombie
    assert not locks._pid_alive(child.pid)
    _write_lock(tmp_path / "store", pid=child.pid)
    with hold_lock(tmp_path / "store", "the queue store"):
        assert _lock_record(tmp_path / "store")["pid"] == os.getpid()
    child.wait()
