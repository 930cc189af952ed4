"""What every benchmark shares: sizes, the machine's description, process memory, timing and figures.

Importing this module puts the repository root on sys.path (so `eimctl` imports from the
working tree) and keeps Hugging Face offline; it imports nothing heavy itself.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "run.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COCO_ROWS = 566_747
DIM = 768
BATCH = 40
SCALES = {
    # rows of the InfoNCE queue, generation tokens, timed train steps, demo images for training/queues
    "small": {"infonce_rows": 131_072, "infonce_seconds": 20, "memory_rows": COCO_ROWS, "gen_tokens": 20, "train_steps": 3,
              "train_rounds": 5, "images": 200, "queue_rows": 1024, "queue_rounds": 3,
              "cache_rounds": 2},
    "full": {"infonce_rows": COCO_ROWS, "infonce_seconds": 60, "memory_rows": COCO_ROWS, "gen_tokens": 40, "train_steps": 20,
             "train_rounds": 5, "images": 3000, "queue_rows": 16384, "queue_rounds": 5,
             "cache_rounds": 2},
}


# ----------------------------------------------------------------------------- the machine

def machine() -> dict:
    import torch
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "memory_gib": round(mem / 2**30, 1),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def machine_key(info: dict) -> str:
    return f"{info['cpu']}, {info['cores']} cores, {info['gpu'] or 'no GPU'}"


# ----------------------------------------------------------------------------- process memory

def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- timing

def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU, or for device None."""
    import torch
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, min_reps: int = 3, min_seconds: float = 2.0, warmup: int = 1) -> float:
    """Median seconds per call of fn() (after warm-up), at least min_reps calls and min_seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, started = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


def interleaved_times(jobs: dict, device, rounds: int, *, calls: int = 1, untimed_first: bool = False,
                      seconds: float | None = None, alternate: bool = False) -> dict[object, list[float]]:
    """Seconds of `calls` calls of each job, per round; the jobs take turns within every round, so all
    see the same background load.

    untimed_first: each timed call comes right after an untimed one of the same job (so it starts from
    that job's own cache and allocator state); seconds: no new round once this much time has passed;
    alternate: every other round runs the jobs in reverse order; device None: the jobs wait for their own
    work (no synchronisation around them)."""
    times = {name: [] for name in jobs}
    started = time.perf_counter()
    for round_ in range(rounds):
        order = list(jobs.items())
        if alternate and round_ % 2:
            order.reverse()
        for name, job in order:
            if untimed_first:
                job()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                job()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if seconds is not None and time.perf_counter() - started > seconds:
            break
    return times


# ----------------------------------------------------------------------------- figures and data

def figure(title, a_label, a, b_label, b, unit, *, ratio=None, ratio_label="ratio", target=None,
           higher_is_better=True, note=""):
    ratio = a / b if ratio is None else ratio
    met = None
    if target is not None:
        met = ratio >= target if higher_is_better else ratio <= target
    return {"title": title, "a_label": a_label, "a": a, "b_label": b_label, "b": b, "unit": unit,
            "ratio": ratio, "ratio_label": ratio_label, "target": target,
            "target_op": ">=" if higher_is_better else "<=", "met": met, "note": note}


def random_unit_rows(rows: int, dim: int, seed: int = 0, chunk: int = 65_536):
    import numpy as np
    rng = np.random.default_rng(seed)
    for start in range(0, rows, chunk):
        block = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        yield block


def write_memmap_queue(path: Path, rows: int, dim: int):
    import numpy as np
    keys = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    start = 0
    for block in random_unit_rows(rows, dim):
        keys[start:start + len(block)] = block
        start += len(block)
    keys.flush()
    del keys
