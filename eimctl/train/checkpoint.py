"""Checkpoints: trainable tensors in safetensors, trainer state loaded with weights_only=True.

    checkpoints/step-000100/{trainable.safetensors, trainer_state.pt}
    checkpoints/step-000100/{dcp/, trainer_state.pt}      dist.checkpoint_format=sharded (eimctl/train/fsdp.py)

A checkpoint folder is built under a temporary name and renamed into place, so a
crash leaves either the previous checkpoint or the new one, never a torn one.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from eimctl.runtime import faults
from eimctl.runtime.errors import EimError, disk_full
from eimctl.runtime.weights import WEIGHTS, save_weights, trainable_tensors

STATE = "trainer_state.pt"
DCP = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint folder
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def save_checkpoint(checkpoints: Path, step: int, model: nn.Module, state: dict, keep: int,
                    tensors: dict | None = None) -> Path:
    """`tensors`: the trainable tensors when already gathered (FSDP); else the model's."""
    final = checkpoints / f"step-{step:06d}"
    tmp = checkpoints / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_weights(tmp / WEIGHTS, trainable_tensors(model) if tensors is None else tensors)
        faults.crash_in_checkpoint(step, "weights")
        torch.save(state, tmp / STATE)
        faults.crash_in_checkpoint(step, "rename")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as error:  # leave the previous checkpoints only, never a partial folder
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise disk_full(error, final) from error
        raise
    for old in list_checkpoints(checkpoints)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders are ignored)."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if STEP_DIR.match(p.name)
             and ((p / WEIGHTS).is_file() or (p / DCP / ".metadata").is_file()) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_state(folder: Path) -> dict:
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means a damaged or foreign file
        raise EimError(f"cannot read trainer state: {type(error).__name__}", where=str(folder / STATE),
                       hint="delete that checkpoint folder to resume from the one before") from None
