"""Checkpoints: trainable tensors in safetensors, trainer state loaded with weights_only=True.

    checkpoints/step-000100/{trainable.safetensors, trainer_state.pt}

A checkpoint folder is built under a temporary name and renamed into place, so a
crash leaves either the previous checkpoint or the new one, never a torn one.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eimctl.errors import EimError, disk_full

WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, by name (tied weights appear once)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise disk_full(error, path) from error
        raise


def _test_crash(step: int, point: str) -> None:
    """Fault injection for the crash tests: EIMCTL_TEST_CRASH_IN_CHECKPOINT=<step>:<weights|rename>
    SIGKILLs this process inside save_checkpoint (after the weights file / before the rename)."""
    if os.environ.get("EIMCTL_TEST_CRASH_IN_CHECKPOINT") == f"{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load saved tensors into `model`; every saved name must exist with the same shape."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise EimError(f"cannot read weights: {error}", where=str(path),
                       hint="the file is damaged; rerun the step that wrote it with --force") from None
    own = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in own]
    wrong = [f"{n} {tuple(tensors[n].shape)} vs {tuple(own[n].shape)}"
             for n in tensors if n in own and tensors[n].shape != own[n].shape]
    if unknown or wrong:
        detail = (f"unknown tensors {unknown[:3]}" if unknown else f"shape mismatch {wrong[:3]}")
        raise EimError(f"checkpoint is from another architecture: {detail}", where=str(path),
                       hint="use the model config the checkpoint was trained with")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))


def save_checkpoint(checkpoints: Path, step: int, model: nn.Module, state: dict, keep: int) -> Path:
    final = checkpoints / f"step-{step:06d}"
    tmp = checkpoints / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_weights(tmp / WEIGHTS, trainable_tensors(model))
        _test_crash(step, "weights")
        torch.save(state, tmp / STATE)
        _test_crash(step, "rename")
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
             and (p / WEIGHTS).is_file() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_state(folder: Path) -> dict:
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means a damaged or foreign file
        raise EimError(f"cannot read trainer state: {type(error).__name__}", where=str(folder / STATE),
                       hint="delete that checkpoint folder to resume from the one before") from None
