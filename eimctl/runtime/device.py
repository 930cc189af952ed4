"""Where a step computes, and which process writes.

`writes_here()` is the single point that decides whether this process writes
artifacts (configs, metrics, checkpoints, manifests). Today every run is one
process; under torch.distributed only rank 0 will write.
"""
from __future__ import annotations

import os

import torch

from eimctl.runtime.errors import EimError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EimError("train.device=cuda but no CUDA device is visible", hint="use train.device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def writes_here() -> bool:
    """True in the process that writes artifacts: the only one, or rank 0 of a distributed launch."""
    return int(os.environ.get("RANK", "0")) == 0
