"""`eimctl build-queues`: the three frozen key queues, one row per training sample.

    eimctl build-queues --config examples/demo-eim.yaml [--encoder clip-vit-l14]

    kt  CLIP.text [EOS] feature of the sample's caption (CLIP's joint space)
    ke  mean of the LM embedding-layer outputs over the sample's instruction + response tokens
    kb  the frozen, original LM's last-token hidden state (final block, after the final norm)

A queue depends only on the data set and the frozen models, so it lives in the
top-level store `queues/<data>-<models>-<fingerprint>/` and is reused by every
run. Each queue is built in parts (`.parts/<queue>-NNNNN.npy`, written
atomically), so a killed build resumes part by part; the Parquet is assembled
from the parts, and the manifest is written last.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eimctl.atomic import atomic_path
from eimctl.config import Config, fingerprint
from eimctl.data.captions import CaptionSplit, read_split
from eimctl.errors import EimError
from eimctl.losses import mean_pool
from eimctl.models.captioner import pad_batch, tokenize_split
from eimctl.models.clip import ClipEncoder
from eimctl.models.lm import load_lm
from eimctl.progress import StepProgress, log
from eimctl.queue_store import open_queue, read_queue_info, write_queue
from eimctl.rundir import complete_manifest, require_upstream, write_manifest
from eimctl.trainer import resolve_device

QUEUES = ("kt", "ke", "kb")
FIELDS = {"kt": "clip.text.eos", "ke": "lm.embedding.mean", "kb": "lm.last_token.hidden"}
PART_ROWS = 16_384
BATCH = 256


def queue_fingerprint(config: Config, train: CaptionSplit) -> str:
    """What the keys depend on: the data, the frozen CLIP and LM, tokenisation, storage dtype."""
    clip, lm = config.model.clip, config.model.lm
    return fingerprint({"data": train.fingerprint, "clip": [clip.name, clip.pretrained],
                        "lm": [lm.name, lm.gguf_file], "max_tokens": config.data.max_caption_tokens,
                        "dtype": config.eim.queue_dtype})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(text.rstrip("/")).name or text).strip("-").lower()[:40]


def queue_folder(config: Config, train: CaptionSplit) -> Path:
    data = _slug(config.data.path)
    models = f"{_slug(config.model.clip.name.split(':')[-1])}-{_slug(config.model.lm.name)}"
    return Path(config.eim.queues_dir) / f"{data}-{models}-{queue_fingerprint(config, train)}"


def require_queues(config: Config, train: CaptionSplit, names: list[str]) -> dict:
    """Open the named queues memory-mapped, after checking they match this data set and models."""
    folder = queue_folder(config, train)
    require_upstream(folder, "key queues for this data set and models", "eimctl build-queues <same config>",
                     {"queues": queue_fingerprint(config, train)}, missing="have not been built")
    keys = {}
    for name in names:
        keys[name], _ = open_queue(folder / f"{name}.parquet", expect_rows=len(train.samples),
                                   expect_data_fingerprint=train.fingerprint,
                                   expect_encoder=config.model.clip.name if name == "kt" else config.model.lm.name)
    return keys


def _prepare_batch(name: str, clip, captions: list[str], token_ids: list[list[int]], pad_id: int):
    """The CPU-side work of a batch (CLIP's BPE tokenizer, or padding), done ahead of the encoder."""
    if name == "kt":
        return (clip.tokenizer(captions),)
    return pad_batch(token_ids, pad_id)


def _encode_batch(name: str, clip, lm, prepared: tuple, device: torch.device) -> np.ndarray:
    if name == "kt":
        keys = clip.model.encode_text(prepared[0].to(device, non_blocking=True))
    else:
        ids, mask = (t.to(device, non_blocking=True) for t in prepared)
        if name == "ke":
            keys = mean_pool(lm.get_input_embeddings()(ids), mask)
        else:
            # The backbone alone: its last_hidden_state is the final block's output after the final norm,
            # and skipping the LM head saves a [B, L, vocab] product (50,257 wide for GPT-2).
            hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            keys = hidden[torch.arange(len(ids), device=device), mask.sum(dim=1) - 1]
    keys = torch.nn.functional.normalize(keys.float(), dim=-1)
    return keys.cpu().numpy()


@torch.no_grad()
def _build_parts(name: str, parts_dir: Path, clip, lm, train: CaptionSplit, token_ids, pad_id,
                 device, show: bool, workers: int = 0) -> list[Path]:
    rows = len(train.samples)
    part_rows = int(os.environ.get("EIMCTL_QUEUE_PART_ROWS", PART_ROWS))  # tests use small parts
    delay = float(os.environ.get("EIMCTL_TEST_STEP_DELAY", "0"))          # test hook: time to SIGKILL
    part_paths = [parts_dir / f"{name}-{start // part_rows:05d}.npy" for start in range(0, rows, part_rows)]
    progress = StepProgress(f"build {name}", rows, log_every=part_rows, enabled=show)
    spans = []  # (begin, end, part number) of every batch still to encode
    for number, path in enumerate(part_paths):
        start, stop = number * part_rows, min(rows, (number + 1) * part_rows)
        if path.is_file():  # finished before an interruption: keep it
            progress.update(stop)
            continue
        spans += [(begin, min(stop, begin + BATCH), number) for begin in range(start, stop, BATCH)]

    def prepare(begin: int, end: int, number: int):
        return _prepare_batch(name, clip, [s.caption for s in train.samples[begin:end]], token_ids[begin:end],
                              pad_id)

    chunks: list[np.ndarray] = []
    for (begin, end, number), prepared in zip(spans, _prepared_batches(spans, prepare, workers)):
        chunks.append(_encode_batch(name, clip, lm, prepared, device))
        progress.update(end)
        if end == min(rows, (number + 1) * part_rows):  # the part is complete
            with atomic_path(part_paths[number]) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, np.concatenate(chunks), allow_pickle=False)
            chunks = []
            if delay:
                time.sleep(delay)
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


def run(config: Config, *, force: bool = False, show: bool = True) -> Path:
    started = time.time()
    train = read_split(config.data, "train")
    folder = queue_folder(config, train)
    fps = {"queues": queue_fingerprint(config, train), "data": train.fingerprint}
    existing = complete_manifest(folder)
    if existing and not force and existing.get("fingerprints") == fps:
        log(f"key queues already built in {folder} — skipping; --force rebuilds them", show)
        return folder
    if force and folder.exists():
        shutil.rmtree(folder)
    (folder / "manifest.json").unlink(missing_ok=True)
    parts_dir = folder / ".parts"
    parts_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(config.train.device)
    clip = ClipEncoder(config.model.clip).to(device).eval()
    lm, tokenizer = load_lm(config.model.lm)
    lm.to(device).eval()
    token_ids = tokenize_split(tokenizer, train, config.data, show)
    sample_ids = [s.sample_id for s in train.samples]
    dims = {}
    for name in QUEUES:
        target = folder / f"{name}.parquet"
        if target.is_file():
            try:
                info = read_queue_info(target)
                if info.rows == len(sample_ids) and info.data_fingerprint == train.fingerprint:
                    dims[name] = info.dim
                    continue
            except EimError:
                pass  # a damaged file is rebuilt below
        parts = _build_parts(name, parts_dir, clip, lm, train, token_ids, tokenizer.pad_token_id, device, show,
                             config.train.num_workers)
        encoder = config.model.clip.name if name == "kt" else config.model.lm.name
        write_queue(target, _read_parts(parts), sample_ids, encoder=encoder, field=FIELDS[name],
                    normalised=True, dtype=config.eim.queue_dtype, data_fingerprint=train.fingerprint)
        keys, info = open_queue(target)  # builds the memory-mappable sidecar now, not at training time
        dims[name] = info.dim
        for part in parts:
            part.unlink(missing_ok=True)
    shutil.rmtree(parts_dir, ignore_errors=True)
    write_manifest(folder, step="build-queues", config={"data": vars(config.data), "clip": vars(config.model.clip),
                                                        "lm": vars(config.model.lm), "eim": vars(config.eim)},
                   fingerprints=fps, outputs=[f"{n}.parquet" for n in QUEUES], started=started,
                   extra={"rows": len(sample_ids), "dims": dims})
    log(f"key queues ({len(sample_ids)} rows; dims {dims}) -> {folder}", show)
    return folder
