"""Fault-injection and pacing hooks for the crash-safety tests, all in one place.

Production code calls these at fixed points; each does nothing unless its
environment variable is set:

    EIMCTL_TEST_CRASH_AT_STEP=N                die like a killed job right after training step N
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
    """Die like a killed job (no cleanup) right after `step`, once `flush()` has saved the logs."""
    if int(os.environ.get("EIMCTL_TEST_CRASH_AT_STEP", "0")) == step:
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
