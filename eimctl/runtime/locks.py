"""One writer per run directory or queue store: a `.lock` file in it that names its holder.

    with hold_lock(stage_dir(run_dir, stage), f"stage {stage!r} in {run_dir}"):
        ...  # a requeued job or a double launch cannot hold this folder meanwhile

`folder/.lock` is created atomically (O_CREAT|O_EXCL) with JSON {host, pid, started, argv, job, token}
and removed on exit, also after an exception, while it is still ours. A live holder stops the caller
with one line naming it. A stale lock is taken over: same host and its pid is gone; another host (or
pid namespace) and no heartbeat (the holder touches the mtime every EIMCTL_LOCK_HEARTBEAT_S, 30 s) for
EIMCTL_LOCK_STALE_S (600 s); or unparsable (torn) and older than a few seconds. A take-over renames
exactly the stale file aside, then creates the lock again: of two racing take-overs one wins, the other
is refused. Under torchrun or srun only rank 0 takes the lock, for the whole launch. A lock this process
already holds is a no-op, so nested or repeated calls do not deadlock.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from eimctl.runtime.distributed import is_writer
from eimctl.runtime.errors import EimError
from eimctl.runtime.progress import log

LOCK_NAME = ".lock"
TORN_AFTER_S = 5.0          # an unparsable lock older than this is a torn write, not one being written
_held: set[str] = set()     # lock paths this process holds
try:                        # containers sharing a host name see each other's pids only in one namespace
    _PID_NS: str | None = os.readlink("/proc/self/ns/pid")
except OSError:
    _PID_NS = None


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        seconds = float(value) if value.strip() else default
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise EimError(f"environment variable {name}={value!r} is not a positive number of seconds",
                       hint=f"set it to e.g. {default:g}, or unset it")
    return seconds


def _record() -> dict:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": _PID_NS,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": list(sys.argv),
            "job": job if job and job != "none" else None, "token": uuid.uuid4().hex}


def _create(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists (O_CREAT|O_EXCL); True when we created it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)         # never leave an empty lock behind (e.g. disk full)
        raise
    return True


def _read(path: Path) -> tuple[bytes, dict | None, os.stat_result] | None:
    """(raw bytes, parsed record or None when torn, stat) of the lock; None when there is none."""
    try:
        stat = os.stat(path)
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw, None, stat
    valid = isinstance(record, dict) and isinstance(record.get("pid"), int) and bool(record.get("host"))
    return raw, record if valid else None, stat


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # alive, owned by another user
        return True
    try:                                     # a killed process nobody has reaped yet (a zombie) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _stale_reason(record: dict | None, stat: os.stat_result) -> str | None:
    """Why the lock is stale (for the log line), or None while its holder may be alive."""
    age = time.time() - stat.st_mtime
    if record is None:
        return f"an unreadable lock ({age:.0f}s old)" if age > TORN_AFTER_S else None
    if record["host"] == socket.gethostname() and record.get("pid_ns") in (None, _PID_NS):
        return None if _pid_alive(record["pid"]) else f"pid {record['pid']} (no longer running)"
    if age > _seconds("EIMCTL_LOCK_STALE_S", 600):
        return f"pid {record['pid']} on {record['host']} (no heartbeat for {age:.0f}s)"
    return None


def _busy(path: Path, what: str, record: dict | None) -> EimError:
    hint = f"wait for it to finish, or if you are sure it is no longer running, delete {path}"
    if record is None:
        return EimError(f"{what} is in use (its lock file is being written)", hint=hint)
    job = f" (job {record['job']})" if record.get("job") else ""
    return EimError(f"{what} is in use by pid {record['pid']} on {record['host']} since "
                    f"{record.get('started', '?')}{job}", hint=hint)


def _take_over(path: Path, raw: bytes, stat: os.stat_result) -> bool:
    """Move the stale lock (exactly the file judged stale) aside; False when someone else moved it first."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = os.stat(aside)
    if (moved.st_dev, moved.st_ino) == (stat.st_dev, stat.st_ino) and aside.read_bytes() == raw:
        aside.unlink()
        return True
    with suppress(FileExistsError):          # we moved a newer, live lock: put it back
        os.link(aside, path)
    aside.unlink()
    return False


def _acquire(path: Path, what: str, record: dict) -> None:
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    for _ in range(3):                       # the holder may release between our attempts
        if _create(path, data):
            return
        found = _read(path)
        if found is None:
            continue
        raw, holder, stat = found
        reason = _stale_reason(holder, stat)
        if reason is None:
            raise _busy(path, what, holder)
        if not _take_over(path, raw, stat) or not _create(path, data):
            raise _busy(path, what, _holder(path) or holder)
        log(f"taking over a stale lock of {reason}: {path}")
        return
    raise _busy(path, what, _holder(path))


def _holder(path: Path) -> dict | None:
    found = _read(path)
    return found[1] if found else None


def _heartbeat(path: Path, token: str, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            if (_holder(path) or {}).get("token") != token:
                return
            os.utime(path)
        except OSError:
            pass                             # a file-system hiccup: try again next beat


@contextmanager
def hold_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder/.lock` for the block; `what` names the folder in errors, e.g. "stage 'st' in runs/x"."""
    path = Path(folder).resolve() / LOCK_NAME
    if not is_writer() or str(path) in _held:   # another rank, or a lock this process already holds
        yield
        return
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # removed again if left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    every_s, record = _seconds("EIMCTL_LOCK_HEARTBEAT_S", 30), _record()
    try:
        _acquire(path, what, record)
    except BaseException:
        _remove_empty(created)
        raise
    _held.add(str(path))
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, record["token"], every_s, stop),
                            name=f"eimctl-lock-heartbeat {path}", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        _held.discard(str(path))
        if (_holder(path) or {}).get("token") == record["token"]:
            path.unlink(missing_ok=True)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders the lock created, innermost first, where nothing else was written in them."""
    for folder in folders:
        with suppress(OSError):
            folder.rmdir()


def clear_keeping_lock(folder: Path) -> None:
    """Delete everything in `folder` but its lock (a --force rerun that holds the folder)."""
    import shutil

    for child in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
