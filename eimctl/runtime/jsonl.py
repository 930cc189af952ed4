"""JSON Lines files: one JSON object per line."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path, *, tolerant: bool = False) -> tuple[list[dict], int]:
    """(records, unreadable line count). With `tolerant`, lines that are not JSON objects (e.g. a
    line cut by a crash) are counted and skipped; otherwise the first one raises ValueError."""
    records, bad = [], 0
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif tolerant:
            bad += 1
        else:
            raise ValueError(f"{path}, line {number}: not a JSON object")
    return records, bad
