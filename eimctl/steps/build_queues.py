"""`eimctl build-queues`: the three frozen key queues, one row per training sample.

    eimctl build-queues --config examples/demo-eim.yaml [--encoder clip-vit-l14] [--shard I/N]

What each key is: eimctl/eim/queue_kinds.py (kt: CLIP.text [EOS] of the caption;
ke: mean LM embedding over instruction + response; kb: the frozen LM's last-token
hidden state). A queue depends only on the data set and the frozen models, so it
lives in the top-level store `queues/<data>-<models>-<fingerprint>/` and is reused
by every run. Each queue is built in parts (`.parts/<queue>-NNNNN.npy`, written
atomically), so a killed build resumes part by part; the Parquet is assembled from
the parts, and the manifest is written last. A SIGINT/SIGTERM finishes the current part, then
exits with one line and code 128 + signal; rerunning the same command continues.

Many processes (eimctl/eim/queue_parts.py): under torchrun/srun, rank r builds the parts numbered
p with p mod W == r, then, after a barrier, rank 0 checks and assembles each queue and writes the
manifest while the others wait. `--shard I/N` builds shard I's parts without any process group
(SLURM job arrays, ssh loops) and exits; the plain command then builds whatever is still missing and
assembles. Batches start at part boundaries, so the keys are bit for bit the same at any world size.

Once the queues are written, each one's diagnostics (near-duplicate rate, mean cosine to the
mean key, floor loss; eimctl/eim/queue_diagnostics.py) are printed, one line per queue, and
stored in the manifest under `diagnostics`. They are computed at build time only: a build
skipped because the queues are complete prints and recomputes nothing (`--force` rebuilds).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eimctl.config import Config
from eimctl.data.tokens import pad_batch, tokenize_for_training
from eimctl.eim.queue_diagnostics import diagnose_queue
from eimctl.eim.queue_kinds import QUEUE_KINDS
from eimctl.eim.queue_parts import (Owner, check_parts, claim_plan, make_plan, missing_owned, parse_shard,
                                    part_paths, part_span)
from eimctl.eim.queue_store import open_queue, read_queue_info, write_queue
from eimctl.eim.queues import encoder_name, queue_fingerprint, queue_folder
from eimctl.models.factory import build_model
from eimctl.runtime import faults
from eimctl.runtime.atomic import write_npy
from eimctl.runtime.device import resolve_device
from eimctl.runtime.distributed import (barrier, broadcast_object, check_shared, current, device_for, finish,
                                        is_writer, leave, start, world_from_env)
from eimctl.runtime.errors import EimError
from eimctl.runtime.locks import clear_keeping_lock, hold_lock
from eimctl.runtime.interrupts import PartsInterrupted, StopSignals
from eimctl.runtime.progress import StepProgress, log
from eimctl.runtime.rundir import skip_or_run, write_manifest
from eimctl.tasks import formatter, get_task

PART_ROWS = 16_384
BATCH = 256


def _prepare_batch(kind, model, texts: list[str], tokens: list) -> dict:
    """The CPU-side work of a batch (CLIP's BPE tokenizer, or padding), done ahead of the encoder."""
    if kind.text == "clip":
        return {"clip_ids": model.clip.tokenizer(texts)}
    return pad_batch(tokens, model.tokenizer.pad_token_id)


def _encode_batch(kind, model, prepared: dict, device: torch.device) -> np.ndarray:
    prepared = {name: tensor.to(device, non_blocking=True) for name, tensor in prepared.items()}
    keys = torch.nn.functional.normalize(kind.key(model, prepared).float(), dim=-1)
    return keys.cpu().numpy()


@dataclass
class _Encoding:
    """What every part's batches are made from: the frozen model and the whole split's texts and tokens."""
    model: object
    texts: list
    tokens: list
    device: torch.device
    workers: int = 0
    show: bool = True


def _spans_to_build(numbers: list[int], rows: int, part_rows: int) -> list[tuple[int, int, int]]:
    """(begin, end, part number) of every batch of the given parts. Batches start at each part's first row,
    so a part's batches (and keys) are the same whichever process builds it."""
    spans = []
    for number in numbers:
        start, stop = part_span(number, rows, part_rows)
        spans += [(begin, min(stop, begin + BATCH), number) for begin in range(start, stop, BATCH)]
    return spans


@torch.no_grad()
def _build_parts(kind, paths: list[Path], owner: Owner, encoding: _Encoding, stop: StopSignals | None = None) -> int:
    """Encode this process's missing parts of the queue (`owner`'s share; parts finished before an interruption
    are kept); returns how many were built. On a SIGINT/SIGTERM (`stop`), finish the current part and raise
    PartsInterrupted."""
    rows = len(encoding.texts)
    part_rows = faults.queue_part_rows(PART_ROWS)
    numbers = missing_owned(paths, owner)
    def rows_of(parts) -> int:
        return sum(stop - start for start, stop in (part_span(n, rows, part_rows) for n in parts))

    total = rows_of(n for n in range(len(paths)) if owner.owns(n))
    done = total - rows_of(numbers)  # this process's parts already on disk
    progress = StepProgress(f"build {kind.name}", total, log_every=part_rows, enabled=encoding.show)
    if done:
        progress.update(done)
    spans = _spans_to_build(numbers, rows, part_rows)

    def prepare(begin: int, end: int, number: int):
        return _prepare_batch(kind, encoding.model, encoding.texts[begin:end], encoding.tokens[begin:end])

    chunks: list[np.ndarray] = []
    for (begin, end, number), prepared in zip(spans, _prepared_batches(spans, prepare, encoding.workers)):
        chunks.append(_encode_batch(kind, encoding.model, prepared, encoding.device))
        done += end - begin
        progress.update(done)
        if end == part_span(number, rows, part_rows)[1]:  # the part is complete
            write_npy(paths[number], np.concatenate(chunks))
            chunks = []
            faults.pace()
            if stop is not None and stop.signal:
                progress.close()
                raise PartsInterrupted(stop.signal, f"building the {kind.name} queue",
                                       sum(path.is_file() for path in paths), len(paths))
    progress.close()
    return len(numbers)


def _prepared_batches(spans: list, prepare, workers: int):
    """prepare(*span) for each span, in order, computed ahead of the encoder that consumes them.

    With `workers` (train.num_workers) > 0, worker processes tokenise in parallel: CLIP's BPE
    tokenizer is pure Python and, on a GPU, slower than the text encoder itself. Otherwise one
    thread prepares the next batch while the current one is encoded."""
    if workers > 0 and spans:
        loader = DataLoader(_Spans(spans, prepare), batch_size=None, num_workers=workers,
                            collate_fn=_as_is, prefetch_factor=4)
        yield from loader
        return
    with ThreadPoolExecutor(max_workers=1) as ahead:
        pending = ahead.submit(prepare, *spans[0]) if spans else None
        for k in range(len(spans)):
            prepared = pending.result()
            if k + 1 < len(spans):
                pending = ahead.submit(prepare, *spans[k + 1])
            yield prepared


class _Spans(Dataset):
    def __init__(self, spans: list, prepare):
        self.spans, self.prepare = spans, prepare

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int):
        return self.prepare(*self.spans[index])


def _as_is(item):
    return item


def _read_parts(paths: list[Path]):
    for path in paths:
        try:
            yield np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            path.unlink(missing_ok=True)
            raise EimError(f"queue part is damaged: {path.name}", where=str(path.parent),
                           hint="it was removed; rerun `eimctl build-queues` to rebuild it") from None


def _complete_queue_dim(target: Path, rows: int, data_fingerprint: str) -> int | None:
    """The key width of an already assembled, intact queue for this data, else None (rebuild it)."""
    if not target.is_file():
        return None
    try:
        info = read_queue_info(target)
    except EimError:
        return None  # a damaged file is rebuilt
    return info.dim if info.rows == rows and info.data_fingerprint == data_fingerprint else None


def _diagnose(target: Path, config: Config, device: torch.device, show: bool) -> dict:
    """Print and return one queue's diagnostics (sampled rows against the whole queue; see the module)."""
    keys, _ = open_queue(target)
    diagnostics = diagnose_queue(keys, duplicate_cosine=config.eim.duplicate_cosine,
                                 most_rows=config.eim.diagnostic_rows, temperature=config.eim.temperature,
                                 device=device)
    name = target.name.removesuffix(".parquet")
    log(diagnostics.line(name), show)
    if diagnostics.indistinguishable:
        log(diagnostics.warning(name), show)
    return diagnostics.as_dict()


def build_queues(config: Config, *, force: bool = False, show: bool = True, shard: str | None = None,
                 config_args: str = " <same config>") -> Path:
    """Build every queue kind for the config's training data; returns the queue folder.

    Under torchrun/srun each rank builds its share of the parts and rank 0 assembles them; with
    `shard="I/N"` (no process group) only shard I's missing parts are built and nothing is assembled."""
    started = time.time()
    owner = parse_shard(shard) if shard is not None else None
    if owner is not None and force:
        raise EimError("--force cannot be combined with --shard (each shard would delete the others' parts)",
                       where="eimctl build-queues", hint="run the plain command with --force instead")
    if owner is not None and world_from_env().distributed:
        raise EimError("--shard is for separate processes, not for a torchrun/srun launch",
                       where="eimctl build-queues", hint="drop --shard: the ranks share the parts between them")
    device = resolve_device(config.train.device)
    world = start(config.dist, device)
    try:
        folder, built = _build(config, force=force, show=show and is_writer(),
                               owner=owner or Owner(world.rank, world.size), assemble=owner is None,
                               device=device_for(device), started=started)
    except BaseException:
        leave()  # no barrier: the other ranks may never reach it; the launcher stops them
        raise
    if owner is not None and built is not None:
        log(f"shard {owner.index}/{owner.count}: {built} parts built; run eimctl build-queues{config_args} "
            "to assemble", show)
    finish()
    return folder


def _start_folder(folder: Path, fps: dict, force: bool, show: bool) -> bool:
    """Rank 0 decides whether the queues are complete (skip) or (re)built; returns True to build.
    Only rank 0 deletes anything; the others wait until the folder is ready."""
    decision = broadcast_object(skip_or_run(folder, "key queues", fps, force=force) if is_writer() else None)
    if decision == "skip":
        log(f"key queues already built in {folder} — skipping; --force rebuilds them", show)
        return False
    if is_writer():
        if force and folder.exists():
            clear_keeping_lock(folder)
        (folder / "manifest.json").unlink(missing_ok=True)
        (folder / ".parts").mkdir(parents=True, exist_ok=True)
    barrier()
    return True


def _build(config: Config, *, force: bool, show: bool, owner: Owner, assemble: bool, device: torch.device,
           started: float) -> tuple[Path, int | None]:
    """Build `owner`'s missing parts of every incomplete queue; with `assemble`, rank 0 then writes each queue
    (after all ranks' parts are on disk) and the manifest. Returns (folder, parts built here), None if skipped."""
    task = get_task(config.data.task)
    train = task.read(config.data, "train")
    folder = queue_folder(config, train)
    fps = {"queues": queue_fingerprint(config, train), "data": train.fingerprint}
    # One assembling build at a time (shards of a job array share the store without assembling).
    with hold_lock(folder, f"the queue store {folder}") if assemble else contextlib.nullcontext():
        if not _start_folder(folder, fps, force, show):
            return folder, None
        check_shared(folder, "the queue store")
        return folder, _build_started(config, task, train, folder, fps, owner, assemble, device, show, started)


def _build_started(config: Config, task, train, folder: Path, fps: dict, owner: Owner, assemble: bool,
                   device: torch.device, show: bool, started: float) -> int:
    rows, part_rows, parts_dir = len(train.samples), faults.queue_part_rows(PART_ROWS), folder / ".parts"
    claim_plan(parts_dir, make_plan(rows, part_rows, [kind.name for kind in QUEUE_KINDS], fps["queues"]))
    # Rank 0 decides which queues are complete, so every rank skips (and waits at) the same ones.
    dims = broadcast_object({kind.name: _complete_queue_dim(folder / f"{kind.name}.parquet", rows, train.fingerprint)
                             for kind in QUEUE_KINDS} if is_writer() else None)
    encoding = _encoding(config, task, train, device, show)
    built = 0
    with StopSignals() as stop:
        for kind in QUEUE_KINDS:
            if dims[kind.name] is not None:
                continue
            paths = part_paths(parts_dir, kind.name, rows, part_rows)
            built += _build_parts(kind, paths, owner, encoding, stop)
            if assemble:
                barrier()  # every rank's parts of this queue are on disk
                if is_writer():
                    dims[kind.name] = _assemble(kind, paths, folder, config, train)
    if assemble and is_writer():
        _write_outputs(folder, config, fps, dims, rows, device, show, started)
    return built


def _encoding(config: Config, task, train, device: torch.device, show: bool) -> _Encoding:
    model, _ = build_model(config, groups=set(), losses=set())
    model.to(device).eval()
    tokens = tokenize_for_training(model.tokenizer, list(map(formatter(task, config), train.samples)), config.data,
                                   f"{config.data.path} (train)", show)
    texts = [task.clip_text(s) for s in train.samples]
    return _Encoding(model, texts, tokens, device, config.train.num_workers, show)


def _assemble(kind, paths: list[Path], folder: Path, config: Config, train) -> int:
    """Rank 0: check every part, stream them into the Parquet queue, build its sidecar, delete the parts;
    returns the key width."""
    target = folder / f"{kind.name}.parquet"
    check_parts(paths, len(train.samples), faults.queue_part_rows(PART_ROWS))
    write_queue(target, _read_parts(paths), [s.sample_id for s in train.samples],
                encoder=encoder_name(config, kind.name), field=kind.field, normalised=True,
                dtype=config.eim.queue_dtype, data_fingerprint=train.fingerprint)
    _, info = open_queue(target)  # builds the memory-mappable sidecar now, not at training time
    for part in paths:
        part.unlink(missing_ok=True)
    return info.dim


def _write_outputs(folder: Path, config: Config, fps: dict, dims: dict, rows: int, device: torch.device,
                   show: bool, started: float) -> None:
    """Rank 0, once every queue is assembled: drop the parts folder, print diagnostics, write the manifest last."""
    shutil.rmtree(folder / ".parts", ignore_errors=True)
    diagnostics = {kind.name: _diagnose(folder / f"{kind.name}.parquet", config, device, show) for kind in QUEUE_KINDS}
    write_manifest(folder, step="build-queues", config={"data": vars(config.data), "clip": vars(config.model.clip),
                                                        "lm": vars(config.model.lm), "eim": vars(config.eim)},
                   fingerprints=fps, outputs=[f"{kind.name}.parquet" for kind in QUEUE_KINDS], started=started,
                   extra={"rows": rows, "dims": dims, "diagnostics": diagnostics,
                          "distributed": {"world_size": current().size, "launcher": current().launcher}})
    log(f"key queues ({rows} rows; dims {dims}) -> {folder}", show)
