"""`eimctl build-queues`: the three frozen key queues, one row per training sample.

    eimctl build-queues --config examples/demo-eim.yaml [--encoder clip-vit-l14]

What each key is: eimctl/eim/queue_kinds.py (kt: CLIP.text [EOS] of the caption;
ke: mean LM embedding over instruction + response; kb: the frozen LM's last-token
hidden state). A queue depends only on the data set and the frozen models, so it
lives in the top-level store `queues/<data>-<models>-<fingerprint>/` and is reused
by every run. Each queue is built in parts (`.parts/<queue>-NNNNN.npy`, written
atomically), so a killed build resumes part by part; the Parquet is assembled from
the parts, and the manifest is written last. A SIGINT/SIGTERM finishes the current part, then
exits with one line and code 128 + signal; rerunning the same command continues.

Once the queues are written, each one's diagnostics (near-duplicate rate, mean cosine to the
mean key, floor loss; eimctl/eim/queue_diagnostics.py) are printed, one line per queue, and
stored in the manifest under `diagnostics`. They are computed at build time only: a build
skipped because the queues are complete prints and recomputes nothing (`--force` rebuilds).
"""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eimctl.config import Config
from eimctl.data.tokens import pad_batch, tokenize_for_training
from eimctl.eim.queue_diagnostics import diagnose_queue
from eimctl.eim.queue_kinds import QUEUE_KINDS
from eimctl.eim.queue_store import open_queue, read_queue_info, write_queue
from eimctl.eim.queues import encoder_name, queue_fingerprint, queue_folder
from eimctl.models.factory import build_model
from eimctl.runtime import faults
from eimctl.runtime.atomic import write_npy
from eimctl.runtime.device import resolve_device
from eimctl.runtime.errors import EimError
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


def _spans_to_build(part_paths: list[Path], rows: int, part_rows: int, progress) -> list[tuple[int, int, int]]:
    """(begin, end, part number) of every batch still to encode; parts finished before an interruption
    are kept."""
    spans = []
    for number, path in enumerate(part_paths):
        start, stop = number * part_rows, min(rows, (number + 1) * part_rows)
        if path.is_file():
            progress.update(stop)
            continue
        spans += [(begin, min(stop, begin + BATCH), number) for begin in range(start, stop, BATCH)]
    return spans


@torch.no_grad()
def _build_parts(kind, parts_dir: Path, model, texts: list[str], tokens: list, device, show: bool,
                 workers: int = 0, stop: StopSignals | None = None) -> list[Path]:
    """Encode the queue's missing parts; on a SIGINT/SIGTERM (`stop`), finish the current part and raise
    PartsInterrupted."""
    rows = len(texts)
    part_rows = faults.queue_part_rows(PART_ROWS)
    part_paths = [parts_dir / f"{kind.name}-{start // part_rows:05d}.npy" for start in range(0, rows, part_rows)]
    progress = StepProgress(f"build {kind.name}", rows, log_every=part_rows, enabled=show)
    spans = _spans_to_build(part_paths, rows, part_rows, progress)

    def prepare(begin: int, end: int, number: int):
        return _prepare_batch(kind, model, texts[begin:end], tokens[begin:end])

    chunks: list[np.ndarray] = []
    for (begin, end, number), prepared in zip(spans, _prepared_batches(spans, prepare, workers)):
        chunks.append(_encode_batch(kind, model, prepared, device))
        progress.update(end)
        if end == min(rows, (number + 1) * part_rows):  # the part is complete
            write_npy(part_paths[number], np.concatenate(chunks))
            chunks = []
            faults.pace()
            if stop is not None and stop.signal:
                progress.close()
                raise PartsInterrupted(stop.signal, f"building the {kind.name} queue",
                                       sum(path.is_file() for path in part_paths), len(part_paths))
    progress.close()
    return part_paths


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


def build_queues(config: Config, *, force: bool = False, show: bool = True) -> Path:
    """Build every queue kind for the config's training data; returns the queue folder."""
    started = time.time()
    task = get_task(config.data.task)
    train = task.read(config.data, "train")
    folder = queue_folder(config, train)
    fps = {"queues": queue_fingerprint(config, train), "data": train.fingerprint}
    if skip_or_run(folder, "key queues", fps, force=force) == "skip":
        log(f"key queues already built in {folder} — skipping; --force rebuilds them", show)
        return folder
    if force and folder.exists():
        shutil.rmtree(folder)
    (folder / "manifest.json").unlink(missing_ok=True)
    parts_dir = folder / ".parts"
    parts_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(config.train.device)
    model, _ = build_model(config, groups=set(), losses=set())
    model.to(device).eval()
    tokens = tokenize_for_training(model.tokenizer, list(map(formatter(task, config), train.samples)), config.data,
                                   f"{config.data.path} (train)", show)
    texts = [task.clip_text(s) for s in train.samples]
    sample_ids = [s.sample_id for s in train.samples]
    dims = {}
    with StopSignals() as stop:
        for kind in QUEUE_KINDS:
            target = folder / f"{kind.name}.parquet"
            dims[kind.name] = _complete_queue_dim(target, len(sample_ids), train.fingerprint)
            if dims[kind.name] is not None:
                continue
            parts = _build_parts(kind, parts_dir, model, texts, tokens, device, show, config.train.num_workers, stop)
            write_queue(target, _read_parts(parts), sample_ids, encoder=encoder_name(config, kind.name),
                        field=kind.field, normalised=True, dtype=config.eim.queue_dtype,
                        data_fingerprint=train.fingerprint)
            _, info = open_queue(target)  # builds the memory-mappable sidecar now, not at training time
            dims[kind.name] = info.dim
            for part in parts:
                part.unlink(missing_ok=True)
    shutil.rmtree(parts_dir, ignore_errors=True)
    diagnostics = {kind.name: _diagnose(folder / f"{kind.name}.parquet", config, device, show) for kind in QUEUE_KINDS}
    write_manifest(folder, step="build-queues", config={"data": vars(config.data), "clip": vars(config.model.clip),
                                                        "lm": vars(config.model.lm), "eim": vars(config.eim)},
                   fingerprints=fps, outputs=[f"{kind.name}.parquet" for kind in QUEUE_KINDS], started=started,
                   extra={"rows": len(sample_ids), "dims": dims, "diagnostics": diagnostics})
    log(f"key queues ({len(sample_ids)} rows; dims {dims}) -> {folder}", show)
    return folder
