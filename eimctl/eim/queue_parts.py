"""The parts a key queue is built from, and which process builds which.

    .parts/plan.json            {rows, part_rows, queues, queue_fingerprint, format}, written once
    .parts/<queue>-NNNNN.npy    rows [N·part_rows, (N+1)·part_rows) of one queue, float32, written atomically

Part numbers are global: part p belongs to the process whose index is p mod count, where
(index, count) is (rank, world size) under torchrun/srun, (I, N) for `--shard I/N`, and (0, 1)
for a plain build. Batches start at part boundaries, so a part's keys are the same whichever
process encodes it, and a build stopped at one world size can be finished at another.

The plan is created first-come (a temporary file hard-linked to plan.json, which fails if it
exists), so two processes never write it at once; every process then compares its own plan with
the one on disk and stops when they differ (e.g. EIMCTL_QUEUE_PART_ROWS changed between runs).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eimctl.runtime.errors import EimError

PLAN_FORMAT = 1
SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Owner:
    """This process's share of the parts: those numbered p with p % count == index."""
    index: int = 0
    count: int = 1

    def owns(self, number: int) -> bool:
        return number % self.count == self.index


def parse_shard(text: str) -> Owner:
    """`--shard I/N` (0 <= I < N) as an Owner; anything else is one clear error."""
    match = SHARD.match(text or "")
    index, count = (int(match[1]), int(match[2])) if match else (None, None)
    if match is None or count < 1 or index >= count:
        raise EimError(f"--shard must be I/N with N >= 1 and 0 <= I < N (e.g. 0/8), not {text!r}",
                       where="eimctl build-queues",
                       hint="run N processes with --shard 0/N ... --shard N-1/N, then the plain command to assemble")
    return Owner(index, count)


def part_paths(parts_dir: Path, name: str, rows: int, part_rows: int) -> list[Path]:
    """Every part of queue `name`, in order (global numbering)."""
    return [parts_dir / f"{name}-{number:05d}.npy" for number in range((rows + part_rows - 1) // part_rows)]


def part_span(number: int, rows: int, part_rows: int) -> tuple[int, int]:
    """The rows [start, stop) of part `number`."""
    return number * part_rows, min(rows, (number + 1) * part_rows)


def make_plan(rows: int, part_rows: int, queues: list[str], queue_fingerprint: str) -> dict:
    return {"format": PLAN_FORMAT, "rows": rows, "part_rows": part_rows, "queues": list(queues),
            "queue_fingerprint": queue_fingerprint}


def claim_plan(parts_dir: Path, plan: dict) -> None:
    """Create `parts_dir/plan.json` unless it exists, then stop with one line if it is not `plan`."""
    path = parts_dir / "plan.json"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".plan.", suffix=".tmp", dir=parts_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(plan, indent=2, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.link(tmp, path)  # atomic create-if-absent: the first process to get here wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    _check_plan(path, plan)


def _check_plan(path: Path, plan: dict) -> None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EimError(f"the queue build plan cannot be read ({' '.join(str(error).split())})", where=str(path),
                       hint="delete the .parts folder (its parts are rebuilt) or rerun with --force") from None
    if not isinstance(found, dict):
        found = {"format": found}
    differ = [f"{key} {found.get(key)!r}, not {plan[key]!r}" for key in plan if found.get(key) != plan[key]]
    if differ:
        raise EimError("the queue parts on disk were planned for another build: " + "; ".join(differ),
                       where=str(path), hint="rerun with the settings they were built with (e.g. "
                                             "EIMCTL_QUEUE_PART_ROWS), or --force to rebuild every part")


def missing_owned(paths: list[Path], owner: Owner) -> list[int]:
    """The numbers of this process's parts that are not on disk yet."""
    return [number for number, path in enumerate(paths) if owner.owns(number) and not path.is_file()]


def check_parts(paths: list[Path], rows: int, part_rows: int) -> None:
    """Before assembly: every part exists with shape (its rows, d) and dtype float32 (read from the .npy header).
    A missing part is one error line; a damaged one is removed, so a rerun rebuilds it."""
    dim = None
    for number, path in enumerate(paths):
        start, stop = part_span(number, rows, part_rows)
        if not path.is_file():
            raise EimError(f"queue part is missing: {path.name}", where=str(path.parent),
                           hint="rerun `eimctl build-queues` (with the same config) to build it")
        try:
            part = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, dtype = part.shape, part.dtype
            del part
        except (ValueError, OSError):
            shape, dtype = None, None
        dim = dim if dim is not None else (shape[1] if shape is not None and len(shape) == 2 else None)
        if shape != (stop - start, dim) or dtype != np.float32:
            path.unlink(missing_ok=True)
            raise EimError(f"queue part is damaged: {path.name}", where=str(path.parent),
                           hint="it was removed; rerun `eimctl build-queues` to rebuild it")
