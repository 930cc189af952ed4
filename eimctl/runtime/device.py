"""Where a step computes, and which process writes.

`writes_here()` is the single point that decides whether this process writes
artifacts (configs, metrics, checkpoints, manifests): the only process, or rank 0
of a torchrun/srun launch (eimctl/runtime/distributed.py).
"""
from __future__ import annotations

import torch

from eimctl.runtime.distributed import is_writer
from eimctl.runtime.errors import EimError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EimError("train.device=cuda but no CUDA device is visible", hint="use train.device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def writes_here() -> bool:
    """True in the process that writes artifacts: the only one, or rank 0 of a distributed launch."""
    return is_writer()
