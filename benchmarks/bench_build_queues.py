"""build-queues: rows/s of eimctl's queue building vs the encoders' raw forward on pre-tokenised batches.

eimctl's side is `_build_parts` of eimctl/steps/build_queues.py for each queue kind (tokenisation,
padding, pooling, L2 normalisation, the copy to NumPy, writing the .npy parts); the raw side is
the encoder forward alone (kt: CLIP encode_text, ke: the LM's embedding layer, kb: the LM's base
model). The demo captions are cycled up to the benchmark's row count.
"""
from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path

import torch

from common import figure, interleaved_times
from eimctl.data.tokens import pad_batch, tokenize_pairs
from eimctl.eim.queue_kinds import QUEUE_KINDS
from eimctl.models.factory import build_model
from eimctl.steps.build_queues import BATCH, _build_parts
from eimctl.tasks import get_task
from workspace import bench_config


def _inputs(cfg, rows: int, device: torch.device):
    """The frozen models, the cycled samples' texts and tokens, and raw forwards over pre-tokenised batches."""
    task = get_task(cfg.data.task)
    train = task.read(cfg.data, "train")
    # Cycle the demo captions up to the benchmark's row count (rows only need captions here).
    samples = [train.samples[i % len(train.samples)] for i in range(rows)]
    model, _ = build_model(cfg, groups=set(), losses=set())
    model.to(device).eval()
    tokens, _ = tokenize_pairs(model.tokenizer, [task.format(s) for s in samples], cfg.data.max_caption_tokens)
    texts = [task.clip_text(s) for s in samples]
    batches = [(b, min(rows, b + BATCH)) for b in range(0, rows, BATCH)]
    text_ids = [model.clip.tokenizer(texts[b:e]).to(device) for b, e in batches]
    padded = [{k: v.to(device) for k, v in pad_batch(tokens[b:e], model.tokenizer.pad_token_id).items()}
              for b, e in batches]
    lm = model.lm
    raw = {
        "kt": lambda: [model.clip.model.encode_text(t) for t in text_ids],
        "ke": lambda: [lm.get_input_embeddings()(p["input_ids"]) for p in padded],
        "kb": lambda: [lm.base_model(input_ids=p["input_ids"], attention_mask=p["attention_mask"]).last_hidden_state
                       for p in padded],
    }
    return model, texts, tokens, raw


def _kind_seconds(kind, work: Path, model, texts, tokens, raw_forward, device, rounds: int, workers: int):
    """Median seconds of eimctl's build and of the raw forward for one queue kind."""
    parts = work / f"parts-{kind.name}"

    def build():
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
        _build_parts(kind, parts, model, texts, tokens, device, False, workers)

    def raw():
        with torch.no_grad():
            raw_forward()

    raw()
    build()
    times = interleaved_times({"raw": raw, "eim": build}, device, rounds)
    shutil.rmtree(parts, ignore_errors=True)
    return statistics.median(times["eim"]), statistics.median(times["raw"])


def run(args, scale: dict, work: Path) -> dict:
    device = torch.device(args.device)
    cfg = bench_config(work, args.device)
    rows = scale["queue_rows"]
    model, texts, tokens, raw = _inputs(cfg, rows, device)
    # Worker processes tokenise ahead of the encoder when there are cores to spare (train.num_workers).
    workers = 0 if (os.cpu_count() or 1) < 4 else min(8, (os.cpu_count() or 1) - 2)
    figures, total_eim, total_raw = [], 0.0, 0.0
    for kind in QUEUE_KINDS:
        eim_s, raw_s = _kind_seconds(kind, work, model, texts, tokens, raw[kind.name], device,
                                     scale["queue_rounds"], workers)
        total_eim += eim_s
        total_raw += raw_s
        figures.append(figure(f"build-queues {kind.name}: {rows} rows, batches of {BATCH} (no target: part of the "
                              "figure above)", "eimctl _build_parts", rows / eim_s, "raw encoder forward",
                              rows / raw_s, "rows/s",
                              note="ke's raw side is an embedding lookup, so its fixed costs (padding, pooling, "
                                   "writing) dominate its ratio while adding little to the total"
                              if kind.name == "ke" else ""))
    figures.insert(0, figure(f"build-queues, all three queues (kt, ke, kb), {rows} rows, train.num_workers={workers}",
                             "eimctl _build_parts", 3 * rows / total_eim, "raw encoder forward",
                             3 * rows / total_raw, "rows/s", target=0.90,
                             note="eimctl's rows/s include tokenisation, padding, L2 normalisation, the copy to "
                                  "NumPy and writing the .npy parts; the raw side is the encoder forward on "
                                  "pre-tokenised batches (kt: CLIP encode_text, ke: the LM's embedding layer, "
                                  "kb: the LM's base model)"))
    return {"figures": figures}
