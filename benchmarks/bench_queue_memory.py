"""queue-memory: peak RSS while a COCO-size float16 queue is memory-mapped during the InfoNCE step.

The queue is written by a child process (`run.py --child _write-queue`), so its Arrow buffers
and page-cache writes are not in this process's RSS; the figure is peak RSS minus the RSS of
the warmed process, against the queue's bytes, at the default `eim.chunk_rows` and two larger ones.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import BATCH, DIM, RUNNER, figure, proc_status, random_unit_rows, reset_peak_rss
from eimctl.eim.losses import default_chunk_rows, queue_infonce
from eimctl.eim.queue_store import open_queue, write_queue


def write_queue_child(work: Path, rows: int) -> None:
    """In the writer child: a random `rows` x DIM float16 queue at work/kt.parquet, with its sidecar."""
    path = work / "kt.parquet"
    write_queue(path, random_unit_rows(rows, DIM), [f"s{i}" for i in range(rows)], encoder="random",
                field="bench", normalised=True, dtype="float16", data_fingerprint="bench")
    open_queue(path, expect_rows=rows)  # builds the memory-mappable sidecar


def _chunk_figure(rows: int, dtype, chunk: int, default_chunk: int, baseline: dict, after: dict, peak_ok: bool,
                  queue_bytes: int, device: torch.device, write_seconds: float) -> dict:
    steady = after["VmRSS"] - baseline["VmRSS"]
    peak = (after["VmHWM"] if peak_ok else after["VmRSS"]) - baseline["VmRSS"]
    return figure(
        f"Queue memory: {rows:,} x {DIM} {dtype} queue memory-mapped (eim.queue_placement=host), peak "
        f"during the InfoNCE step, eim.chunk_rows={chunk}" + (" (the default)" if chunk == default_chunk else ""),
        "peak RSS - baseline RSS", peak / 2**20, "queue bytes", queue_bytes / 2**20, "MiB",
        target=1.10 if chunk == default_chunk else None, higher_is_better=False,
        note=f"baseline RSS {baseline['VmRSS'] / 2**20:.0f} MiB (torch + query, kernels warmed); between steps "
             f"RSS - baseline = {steady / 2**20:.0f} MiB = {steady / queue_bytes:.3f}x the queue, of which "
             f"{(after.get('RssFile', 0) - baseline.get('RssFile', 0)) / 2**20:.0f} MiB file-backed (the "
             f"mapped queue, reclaimable page cache) and "
             f"{(after.get('RssAnon', 0) - baseline.get('RssAnon', 0)) / 2**20:.0f} MiB anonymous; the peak "
             f"adds the float32 conversion buffer of one chunk ({chunk * DIM * 4 / 2**20:.0f} MiB"
             + (", on the GPU, so not in RSS)" if device.type == "cuda" else ")")
             + ("" if peak_ok else "; peak RSS could not be reset, so this is RSS after the step")
             + (f"; write_queue + sidecar took {write_seconds:.0f} s" if chunk == default_chunk else ""))


def run(args, scale: dict, work: Path) -> dict:
    device = torch.device(args.device)
    rows = scale["memory_rows"]
    path = work / "kt.parquet"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(RUNNER), "--child", "_write-queue", "--work", str(work),
                    "--rows", str(rows)], check=True)
    write_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    # The "model": everything a training process holds before it maps the queue, kernels warmed on a tiny queue.
    query = torch.randn(BATCH, DIM, device=device, requires_grad=True)
    positive = torch.randint(rows, (BATCH,))
    small = np.stack(list(random_unit_rows(256, DIM))[0]).astype(np.float16)
    queue_infonce(query, small, positive % 256).backward()
    baseline = proc_status()
    keys, info = open_queue(path, expect_rows=rows)
    queue_bytes = rows * DIM * np.dtype(info.dtype).itemsize
    figures = []
    default_chunk = default_chunk_rows(device)
    for chunk in sorted({default_chunk, 16_384, 65_536}):
        peak_ok = reset_peak_rss()
        for _ in range(2):
            queue_infonce(query, keys, positive, chunk_rows=chunk).backward()
            query.grad = None
        figures.append(_chunk_figure(rows, info.dtype, chunk, default_chunk, baseline, proc_status(), peak_ok,
                                     queue_bytes, device, write_seconds))
    shutil.rmtree(work, ignore_errors=True)
    return {"figures": figures}
