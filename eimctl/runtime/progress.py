"""Progress: a rich bar in a terminal, one plain line per log interval otherwise."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepProgress:
    def __init__(self, description: str, total: int, start: int = 0, log_every: int = 50,
                 enabled: bool = True):
        self.description = description
        self.total = total
        self.log_every = max(1, log_every)
        self.enabled = enabled
        self.started = time.time()
        self.interactive = enabled and sys.stdout.isatty()
        self.bar = None
        if self.interactive:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=Console())
            self.task = self.bar.add_task(description, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.log_every == 0 or step == self.total:
            elapsed = time.time() - self.started
            print(f"{self.description}: {step}/{self.total} {info} [{elapsed:.0f}s]", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def log(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, flush=True)
