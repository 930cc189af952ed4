"""infonce: queue InfoNCE fwd+bwd for each queue placement vs plain torch.mm doing the same two products.

FLOP/s are counted as 4*B*N*d (2BNd logits + 2BNd weighted key sum); the reference is the
best rate of plain `torch.mm` over the same keys held as float32 on the device, at several
chunk sizes. Rounds are interleaved, so the reference and the loss see the same machine state.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from common import BATCH, DIM, figure, interleaved_times, proc_status, reset_peak_rss, write_memmap_queue
from eimctl.eim.losses import default_chunk_rows, queue_infonce
from eimctl.eim.queues import place_queues


def _float32_keys(memmap, rows: int, device: torch.device) -> torch.Tensor:
    keys32 = torch.empty(rows, DIM, device=device)
    for start in range(0, rows, 65_536):
        keys32[start:start + 65_536] = torch.from_numpy(np.array(memmap[start:start + 65_536])).to(device)
    return keys32


def _reference_jobs(keys32: torch.Tensor, chunks: list[int], device: torch.device) -> dict:
    """Plain torch.mm per chunk size: [B,d]x[d,chunk] and [B,chunk]x[chunk,d], streamed over the keys."""
    rows = len(keys32)
    a = torch.randn(BATCH, DIM, device=device)
    w = torch.randn(BATCH, rows, device=device)

    def plain_mm(c):
        for start in range(0, rows, c):
            k = keys32[start:start + c]
            torch.mm(a, k.T), torch.mm(w[:, start:start + c], k)

    return {f"mm {c}": (lambda c=c: plain_mm(c)) for c in chunks}


def _variants(memmap, keys32: torch.Tensor, device: torch.device) -> dict:
    """The queue placements eimctl trains with on this device."""
    if device.type == "cuda":  # training on a GPU copies the queue there (eim.queue_placement=auto)
        return {"float32 on the GPU (the default there)": place_queues({"k": memmap}, "device", device,
                                                                       "float32", False)["k"],
                "float16 on the GPU (eim.device_queue_dtype=float16)": place_queues(
                    {"k": memmap}, "device", device, "float16", False)["k"],
                "float16 memmap streamed from the host (eim.queue_placement=host)": memmap}
    return {"float16 memmap (the default on a CPU)": memmap,
            "float32 in memory (eim.queue_placement=device)": keys32}


def _memory_note(baseline_rss: dict, after: dict, device: torch.device, allocated: int) -> str:
    memory = f"peak RSS over the warmed process {(after.get('VmHWM', 0) - baseline_rss.get('VmRSS', 0)) / 2**20:.0f} MiB"
    if device.type == "cuda":
        memory += (f"; peak GPU memory over what was allocated "
                   f"{(torch.cuda.max_memory_allocated() - allocated) / 2**20:.0f} MiB")
    return memory


def _figures(variants: dict, times: dict, chunks: list[int], rows: int, device, memory: str) -> list[dict]:
    flops = 4 * BATCH * rows * DIM
    median = {name: statistics.median(t) for name, t in times.items()}
    mm_rates = {c: flops / median[f"mm {c}"] for c in chunks}
    mm_rate = max(mm_rates.values())
    figures = []
    for name in variants:
        seconds = median[name]
        figures.append(figure(
            f"Queue InfoNCE fwd+bwd w.r.t. the query, N={rows:,}, d={DIM}, B={BATCH}, keys {name}, "
            f"chunk_rows {default_chunk_rows(device, variants[name]):,}",
            "queue_infonce", flops / seconds / 1e9, "plain torch.mm, same products over float32 keys",
            mm_rate / 1e9, "GFLOP/s", target=0.70,
            note=f"counted 4*B*N*d = {flops / 1e9:.1f} GFLOP per step (2BNd logits + 2BNd weighted key sum); "
                 f"{seconds * 1e3:.1f} ms/step, median of {len(times[name])} rounds interleaved with the reference "
                 f"(each timed call right after an untimed one of the same job); "
                 f"reference = best of " + ", ".join(f"chunk {c:,}: {r / 1e9:.1f}" for c, r in mm_rates.items())
                 + f" GFLOP/s; {memory} (queue {rows * DIM * 2 / 2**20:.0f} MiB as float16)"))
    return figures


def run(args, scale: dict, work: Path) -> dict:
    device = torch.device(args.device)
    rows = scale["infonce_rows"]
    path = work / "infonce-keys.npy"
    write_memmap_queue(path, rows, DIM)
    memmap = np.load(path, mmap_mode="r")
    torch.manual_seed(0)
    keys32 = _float32_keys(memmap, rows, device)
    chunks = sorted({1_024, 2_048, 4_096, 16_384, 65_536} | ({262_144, rows} if device.type == "cuda" else set()))
    jobs = _reference_jobs(keys32, chunks, device)
    variants = _variants(memmap, keys32, device)
    query = torch.randn(BATCH, DIM, device=device, requires_grad=True)
    positive = torch.randint(rows, (BATCH,))

    def loss_step(keys):
        queue_infonce(query, keys, positive).backward()  # chunk_rows: the default for this device and queue
        query.grad = None

    jobs.update({name: (lambda k=k: loss_step(k)) for name, k in variants.items()})
    for job in jobs.values():  # warm-up (also maps the queue and measures its key norms once)
        job()
    baseline_rss = proc_status()
    reset_peak_rss()
    allocated = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    times = interleaved_times(jobs, device, 25, untimed_first=True, seconds=scale["infonce_seconds"])
    memory = _memory_note(baseline_rss, proc_status(), device, allocated)
    figures = _figures(variants, times, chunks, rows, device, memory)
    path.unlink()
    return {"figures": figures}
