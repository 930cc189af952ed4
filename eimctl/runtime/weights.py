"""Trainable tensors on disk: safetensors files, filtered by name, written atomically."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from eimctl.runtime.errors import EimError, disk_full

WEIGHTS = "trainable.safetensors"


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


def _damaged(path: Path, error: Exception) -> EimError:
    return EimError(f"cannot read weights: {error}", where=str(path),
                    hint="the file is damaged; rerun the step that wrote it with --force")


def weight_names(path: Path) -> set[str]:
    """The tensor names in a weights file, without loading the tensors."""
    try:
        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    except (SafetensorError, OSError) as error:
        raise _damaged(path, error) from None


def load_weights(model: nn.Module, path: Path) -> set[str]:
    """Load saved tensors into `model` (every name must exist with the same shape); returns the names."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise _damaged(path, error) from None
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
    return set(tensors)
