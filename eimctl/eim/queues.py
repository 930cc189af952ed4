"""Where a data set's key queues live, and how a training stage opens and places them.

    queues/<data>-<clip>-<lm>-<fingerprint>/{kt,ke,kb}.parquet + manifest.json

A queue depends only on the data set, the task's prompt format and the frozen
models, so every run and ablation on the same data reuses it (queues/README.md).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import torch

from eimctl.config import fingerprint
from eimctl.eim.queue_diagnostics import mean_unit_key, unit_rows
from eimctl.eim.queue_kinds import KIND_BY_NAME
from eimctl.eim.queue_store import open_queue
from eimctl.runtime.errors import EimError
from eimctl.runtime.progress import log
from eimctl.runtime.rundir import require_upstream


def queue_fingerprint(config, train) -> str:
    """What the keys depend on: the data and its task, the frozen CLIP and LM, tokenisation, storage dtype."""
    clip, lm = config.model.clip, config.model.lm
    parts = {"data": train.fingerprint, "task": config.data.task, "clip": [clip.name, clip.pretrained],
             "lm": [lm.name, lm.gguf_file], "max_tokens": config.data.max_caption_tokens,
             "dtype": config.eim.queue_dtype}
    section = getattr(config, config.data.task.replace("-", "_"), None)  # the task's prompt format, if it has one
    if dataclasses.is_dataclass(section):
        parts["task_options"] = dataclasses.asdict(section)
        if getattr(section, "template", "") == "family":  # the prompt template follows the family
            parts["family"] = config.model.family
    return fingerprint(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(text.rstrip("/")).name or text).strip("-").lower()[:40]


def queue_folder(config, train) -> Path:
    data = _slug(config.data.path)
    models = f"{_slug(config.model.clip.name.split(':')[-1])}-{_slug(config.model.lm.name)}"
    return Path(config.eim.queues_dir) / f"{data}-{models}-{queue_fingerprint(config, train)}"


def encoder_name(config, kind_name: str) -> str:
    """The model name recorded with a queue's keys (CLIP's for kt, the LM's for ke and kb)."""
    return config.model.clip.name if KIND_BY_NAME[kind_name].encoder == "clip" else config.model.lm.name


def require_queues(config, train, names: list[str], config_args: str = " <same config>") -> dict:
    """Open the named queues memory-mapped, after checking they match this data set and models.
    `config_args` (the command line's --config files and overrides) completes the suggested command."""
    folder = queue_folder(config, train)
    require_upstream(folder, "key queues for this data set and models", f"eimctl build-queues{config_args}",
                     {"queues": queue_fingerprint(config, train)}, missing="have not been built")
    keys = {}
    for name in names:
        keys[name], _ = open_queue(folder / f"{name}.parquet", expect_rows=len(train.samples),
                                   expect_data_fingerprint=train.fingerprint,
                                   expect_encoder=encoder_name(config, name))
    return keys


def check_queue_widths(model, queues: dict, folder: Path) -> None:
    """Each queue's key width must be what its query will have, before any training starts."""
    for name, keys in queues.items():
        width = KIND_BY_NAME[name].width(model)
        if keys.shape[1] != width:
            raise EimError(f"key queue '{name}' has width {keys.shape[1]}, but this model's {name} query has "
                           f"width {width}", where=str(folder / f"{name}.parquet"),
                           hint="rebuild the queues for this model: eimctl build-queues --force <same config>")


def centred_queues(queues: dict, show: bool = True, chunk_rows: int = 65_536) -> dict:
    """eim.center_keys (our extension, not from the paper): each queue minus its mean unit key, re-normalised.

    The memory-mapped files are never written: the result is a read-only float32 copy in host memory
    (566,747 x 768 keys: 1.7 GiB per queue, on top of any device copy place_queues makes)."""
    centred = {}
    for name, keys in queues.items():
        mean = torch.from_numpy(mean_unit_key(keys, chunk_rows=chunk_rows)).float()
        copy = np.empty(keys.shape, dtype=np.float32)
        for start in range(0, len(keys), chunk_rows):
            block = unit_rows(keys[start:start + chunk_rows]).float() - mean
            copy[start:start + len(block)] = torch.nn.functional.normalize(block, dim=-1).numpy()
        copy.flags.writeable = False  # frozen, so the InfoNCE measures its key norms once
        centred[name] = copy
    log("key queues centred (mean key subtracted, re-normalised): " + ", ".join(centred), show)
    return centred


def place_queues(queues: dict, placement: str, device: torch.device, dtype: str, show: bool) -> dict:
    """Keep the memory-mapped queues (host), or copy each once into the training device's memory (device).

    On a GPU, streaming a COCO-size queue over PCIe every step would cost more than the whole step
    (`make bench`), so `auto` copies it there, as `dtype` (566,747 x 768 keys: 1.6 GiB in float32,
    830 MiB in float16); on a CPU `auto` keeps the memmap."""
    if placement == "host" or (placement == "auto" and device.type != "cuda") or not queues:
        return queues
    placed = {}
    for name, keys in queues.items():
        try:
            tensor = torch.empty(keys.shape, dtype=getattr(torch, dtype), device=device)
            for start in range(0, len(keys), 65_536):
                block = torch.from_numpy(np.ascontiguousarray(keys[start:start + 65_536]))
                tensor[start:start + len(block)].copy_(block)
        except torch.OutOfMemoryError:
            raise EimError(f"key queue '{name}' ({keys.shape[0]:,} x {keys.shape[1]} {dtype}) does not fit in "
                           f"{device} memory", hint="set eim.device_queue_dtype=float16 to halve it, or "
                           "eim.queue_placement=host to stream it from the memory-mapped file") from None
        placed[name] = tensor
    log(f"key queues copied to {device}: " + ", ".join(f"{n} {tuple(k.shape)}" for n, k in placed.items()), show)
    return placed
