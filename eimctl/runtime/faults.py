"""Fault-injection and pacing hooks for the crash-safety tests, all in one place.

Production code calls these at fixed points; each does nothing unless its
environment variable is set:

    EIMCTL_TEST_CRASH_AT_STEP=N                die like a killed job right after training step N
    EIMCTL_TEST_CRASH_RANK=R, _ONCE=PATH       ... only on rank R / only while PATH does not exist (torchrun)
    EIMCTL_TEST_UNSHARED_RANK=R                rank R looks at a private copy of shared folders (a node-local disk)
    EIMCTL_TEST_STEP_DELAY=S                   sleep S seconds after each step / queue part
    EIMCTL_TEST_CRASH_IN_CHECKPOINT=N:POINT    SIGKILL inside checkpoint N's save (POINT: weights|rename)
    EIMCTL_QUEUE_PART_ROWS=R                   build key queues in parts of R rows (tests use small parts)
    EIMCTL_FEATURE_PART_IMAGES=N               build the feature cache in parts of N images
"""
from __future__ import annotations

import os
import signal
import time


def crash_after_step(step: int, flush=None) -> None:
    """Die like a killed job (no cleanup) right after `step`, once `flush()` has saved the logs. Under torchrun,
    EIMCTL_TEST_CRASH_RANK limits it to that rank, and EIMCTL_TEST_CRASH_ONCE=PATH to the first time (it
    leaves PATH behind), so a restarted launch runs through."""
    if int(os.environ.get("EIMCTL_TEST_CRASH_AT_STEP", "0")) != step:
        return
    if os.environ.get("EIMCTL_TEST_CRASH_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    once = os.environ.get("EIMCTL_TEST_CRASH_ONCE")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    if flush is not None:
        flush()
    os._exit(137)


def pace() -> None:
    delay = float(os.environ.get("EIMCTL_TEST_STEP_DELAY", "0"))
    if delay:
        time.sleep(delay)


def crash_in_checkpoint(step: int, point: str) -> None:
    if os.environ.get("EIMCTL_TEST_CRASH_IN_CHECKPOINT") == f"{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def queue_part_rows(default: int) -> int:
    return int(os.environ.get("EIMCTL_QUEUE_PART_ROWS", default))


def feature_part_images(default: int) -> int:
    return int(os.environ.get("EIMCTL_FEATURE_PART_IMAGES", default))


def unshared_view(path):
    """`path` as this rank sees it: elsewhere on the rank EIMCTL_TEST_UNSHARED_RANK names (simulates a run
    directory that is not shared between nodes)."""
    rank = os.environ.get("EIMCTL_TEST_UNSHARED_RANK")
    if rank is None or rank != os.environ.get("RANK"):
        return path
    return path.with_name(path.name + ".private")
