"""User-facing errors: one `Error: ...` line plus a hint, exit code 1, no traceback.

Set EIMCTL_DEBUG=1 to see the traceback as well.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback


class EimError(Exception):
    """A problem the user can fix: what went wrong, where, and how to fix it."""

    def __init__(self, what: str, where: str | None = None, hint: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.hint:
            text += f" — {self.hint}"
        return text


def disk_full(error: OSError, where: str | os.PathLike | None) -> EimError:
    """The one-line error for a write that ran out of space (errno ENOSPC)."""
    return EimError("disk full while writing", where=str(where or getattr(error, "filename", None) or "?"),
                    hint="free space on that file system (or write elsewhere) and rerun; completed work is kept")


def report_and_exit(error: BaseException) -> None:
    """Print one error line on stderr and exit with code 1."""
    if os.environ.get("EIMCTL_DEBUG"):
        traceback.print_exception(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        error = disk_full(error, None)
    # Under torchrun/srun a rank's own problem (e.g. images missing on one node) must say which rank it is.
    rank = f"rank {os.environ.get('RANK', '?')}: " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    if isinstance(error, EimError):
        print(f"Error: {rank}{error.line()}", file=sys.stderr)
    else:
        print(f"Error: {rank}{type(error).__name__}: {error} — rerun with EIMCTL_DEBUG=1 for the traceback",
              file=sys.stderr)
    sys.exit(1)
