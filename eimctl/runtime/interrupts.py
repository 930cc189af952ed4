"""Stop a long loop cleanly on SIGINT / SIGTERM: the signal only sets a flag; the loop checks it at a safe point.

    with StopSignals() as stop:
        for ...:
            ...                      # one unit of work
            if stop.signal: save and raise Interrupted(stop.signal, ...)

A second signal while the first is pending exits at once (exit code 128 + signal number).
Handlers are installed only in the main thread and the previous ones are restored on exit.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A loop stopped by a signal after saving its state; `line()` says where and how to resume."""

    def __init__(self, signal_number: int, step: int, total: int, checkpoint: str, resume: str = ""):
        self.signal_number, self.step, self.total, self.checkpoint = signal_number, step, total, checkpoint
        self.resume = resume  # the command that continues, filled in by the step that knows it
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number

    def line(self) -> str:
        text = (f"Interrupted by {signal.Signals(self.signal_number).name} at step {self.step} of {self.total}: "
                f"checkpoint saved in {self.checkpoint}.")
        return text + (f" Resume with: {self.resume}" if self.resume else "")


class PartsInterrupted(Interrupted):
    """A build made of parts (feature cache, key queues) stopped by a signal after finishing its current part."""

    def __init__(self, signal_number: int, doing: str, done: int, total: int):
        self.doing = doing  # e.g. "encoding train images"
        super().__init__(signal_number, done, total, checkpoint="")

    def line(self) -> str:
        return (f"Interrupted by {signal.Signals(self.signal_number).name} while {self.doing} "
                f"({self.step} of {self.total} parts done): finished parts are kept; "
                "rerun the same command to continue")


class StopSignals:
    """Context manager: `.signal` is the number of the first SIGINT/SIGTERM received, else 0."""

    def __init__(self):
        self.signal = 0
        self.previous: dict = {}

    def _handle(self, signal_number, frame) -> None:
        if self.signal:  # a second signal: the user does not want to wait for the checkpoint
            print(f"{signal.Signals(signal_number).name} again: exiting without a checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(128 + signal_number)
        self.signal = signal_number

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
