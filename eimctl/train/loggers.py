"""Where a stage's logged intervals go: always `metrics.jsonl` (resume and `eimctl report` read it) and,
with `train.loggers=tensorboard`, TensorBoard event files in `<stage>/tensorboard/` as well.

    with MetricsSink(out_dir / "metrics.jsonl", "tensorboard", out_dir) as metrics:
        metrics.log({"step": 20, "loss": 0.71, "lr": 2e-4})
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from eimctl.runtime.errors import EimError


class MetricsSink:
    def __init__(self, jsonl_path: Path, loggers: str, out_dir: Path):
        self.jsonl_path, self.loggers, self.out_dir = jsonl_path, loggers, out_dir
        self.jsonl, self.tensorboard = None, None

    def __enter__(self) -> "MetricsSink":
        if self.loggers == "tensorboard":
            self.tensorboard = _summary_writer(self.out_dir / "tensorboard")
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        return self

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, global_step=record["step"])
            self.tensorboard.flush()

    def flush(self) -> None:
        self.jsonl.flush()

    def __exit__(self, *exc) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise EimError("train.loggers=tensorboard needs the tensorboard package", where="train.loggers",
                       hint="pip install tensorboard (or the eimctl[tensorboard] extra), or set train.loggers=jsonl")
    return SummaryWriter(log_dir=str(folder))
