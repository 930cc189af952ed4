#!/usr/bin/env python
"""eimctl benchmarks: each figure compares eimctl's code path with a plain baseline on the same machine.

    .venv/bin/python benchmarks/run.py                 # CPU-sized defaults (a few minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --scale full    # COCO-scale InfoNCE (N = 566,747) and larger runs
    .venv/bin/python benchmarks/run.py --only generate infonce   # a subset
    EIMCTL_BENCH_SCALE=full make bench

Every benchmark runs in its own child process (so resident-memory figures start
from a clean process), on CUDA when it is available (`--device cpu` forces the
CPU). Models have random weights and the data set is generated on the fly in a
temporary folder; nothing is downloaded. Results are printed and written to
benchmarks/RESULTS.md (one section per machine, the latest run replacing the
previous one for that machine).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
BENCHMARKS = ("infonce", "queue-memory", "generate", "train-step", "build-queues", "feature-cache")


# ----------------------------------------------------------------------------- helpers

def _proc_status() -> dict:
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


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, min_reps: int = 3, min_seconds: float = 2.0, warmup: int = 1) -> float:
    """Median seconds per call of fn() (after warm-up), at least min_reps calls and min_seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, started = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


def _figure(title, a_label, a, b_label, b, unit, *, ratio=None, ratio_label="ratio", target=None,
            higher_is_better=True, note=""):
    ratio = a / b if ratio is None else ratio
    met = None
    if target is not None:
        met = ratio >= target if higher_is_better else ratio <= target
    return {"title": title, "a_label": a_label, "a": a, "b_label": b_label, "b": b, "unit": unit,
            "ratio": ratio, "ratio_label": ratio_label, "target": target,
            "target_op": ">=" if higher_is_better else "<=", "met": met, "note": note}


def _random_unit_rows(rows: int, dim: int, seed: int = 0, chunk: int = 65_536):
    import numpy as np
    rng = np.random.default_rng(seed)
    for start in range(0, rows, chunk):
        block = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        yield block


def _write_memmap_queue(path: Path, rows: int, dim: int):
    import numpy as np
    keys = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    start = 0
    for block in _random_unit_rows(rows, dim):
        keys[start:start + len(block)] = block
        start += len(block)
    keys.flush()
    del keys


# ----------------------------------------------------------------------------- shared workspace

def prepare_workspace(work: Path, scale: dict) -> dict:
    """Demo data (train split of `images` images x 2 captions), a random demo-sized CLIP and GPT-2."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from eimctl.data.demo import generate_demo_data
    from eimctl.demo.pretrain import (CLIP_MEAN, CLIP_STD, DEFAULT_CLIP_MODEL_CFG, DEFAULT_LM_CFG,
                                      END_OF_TEXT, build_word_tokenizer)

    data = work / "data"
    generate_demo_data(data, n_train_images=scale["images"], n_val_images=8, n_test_images=8)
    clip_dir = work / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(DEFAULT_CLIP_MODEL_CFG)
    image_size = cfg["vision_cfg"]["image_size"]
    preprocess_cfg = {"size": image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}))
    torch.manual_seed(0)
    clip = open_clip.CLIP(**copy.deepcopy(cfg))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, clip_dir / "open_clip_model.safetensors")

    captions = [json.loads(line)["caption"] for line in (data / "train.jsonl").read_text().splitlines() if line]
    tokenizer = build_word_tokenizer(captions, DEFAULT_LM_CFG["n_positions"])
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=end_id, eos_token_id=end_id,
                                    pad_token_id=end_id, **DEFAULT_LM_CFG))
    lm_dir = work / "lm"
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return {"data": str(data), "clip": f"local-dir:{clip_dir}", "lm": str(lm_dir)}


def _config(work: Path, device: str, *extra: str):
    from eimctl.config import load_config
    return load_config(overrides=[
        "data.format=jsonl", f"data.path={work / 'data'}", f"model.clip.name=local-dir:{work / 'clip'}",
        "model.clip.pretrained=", "model.clip.tokens=pooled", "model.projector.type=mlp",
        "model.projector.prefix_length=10", f"model.lm.name={work / 'lm'}", f"train.batch_size={BATCH}",
        "train.lr=2e-4", "train.warmup_steps=10", f"train.device={device}", *extra])


# ----------------------------------------------------------------------------- benchmarks

def bench_infonce(args, scale, work: Path) -> dict:
    import numpy as np
    import torch

    from eimctl.losses import default_chunk_rows, queue_infonce
    from eimctl.stages.runner import place_queues

    device = torch.device(args.device)
    rows = scale["infonce_rows"]
    path = work / "infonce-keys.npy"
    _write_memmap_queue(path, rows, DIM)
    memmap = np.load(path, mmap_mode="r")
    torch.manual_seed(0)
    # The plain reference: the same two products per chunk, [B,d]x[d,chunk] and [B,chunk]x[chunk,d], streamed
    # over the same keys held as float32 on the device, at several chunk sizes; the best is the machine's rate.
    keys32 = torch.empty(rows, DIM, device=device)
    for start in range(0, rows, 65_536):
        keys32[start:start + 65_536] = torch.from_numpy(np.array(memmap[start:start + 65_536])).to(device)
    ref_chunks = sorted({1_024, 2_048, 4_096, 16_384, 65_536} | ({262_144, rows} if device.type == "cuda" else set()))
    a = torch.randn(BATCH, DIM, device=device)
    w = torch.randn(BATCH, rows, device=device)

    def plain_mm(c):
        for start in range(0, rows, c):
            k = keys32[start:start + c]
            torch.mm(a, k.T), torch.mm(w[:, start:start + c], k)

    if device.type == "cuda":  # training on a GPU copies the queue there (eim.queue_placement=auto)
        variants = {"float32 on the GPU (the default there)": place_queues({"k": memmap}, "device", device,
                                                                            "float32", False)["k"],
                    "float16 on the GPU (eim.device_queue_dtype=float16)": place_queues(
                        {"k": memmap}, "device", device, "float16", False)["k"],
                    "float16 memmap streamed from the host (eim.queue_placement=host)": memmap}
    else:
        variants = {"float16 memmap (the default on a CPU)": memmap,
                    "float32 in memory (eim.queue_placement=device)": keys32}
    query = torch.randn(BATCH, DIM, device=device, requires_grad=True)
    positive = torch.randint(rows, (BATCH,))

    def loss_step(keys):
        queue_infonce(query, keys, positive).backward()  # chunk_rows: the default for this device and queue
        query.grad = None

    jobs = {f"mm {c}": (lambda c=c: plain_mm(c)) for c in ref_chunks}
    jobs.update({name: (lambda k=k: loss_step(k)) for name, k in variants.items()})
    for job in jobs.values():  # warm-up (also maps the queue and measures its key norms once)
        job()
    baseline_rss = _proc_status()
    _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    times = {name: [] for name in jobs}
    started = time.perf_counter()
    for _ in range(25):  # interleaved rounds, so the reference and the loss see the same machine state
        for name, job in jobs.items():
            job()  # untimed: the timed call then starts from this job's own cache and allocator state
            _sync(device)
            t0 = time.perf_counter()
            job()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - started > scale["infonce_seconds"]:
            break
    after = _proc_status()
    flops = 4 * BATCH * rows * DIM
    median = {name: statistics.median(t) for name, t in times.items()}
    mm_rates = {c: flops / median[f"mm {c}"] for c in ref_chunks}
    mm_rate = max(mm_rates.values())
    memory = f"peak RSS over the warmed process {(after.get('VmHWM', 0) - baseline_rss.get('VmRSS', 0)) / 2**20:.0f} MiB"
    if device.type == "cuda":
        memory += (f"; peak GPU memory over what was allocated "
                   f"{(torch.cuda.max_memory_allocated() - allocated) / 2**20:.0f} MiB")
    figures = []
    for name in variants:
        seconds = median[name]
        figures.append(_figure(
            f"Queue InfoNCE fwd+bwd w.r.t. the query, N={rows:,}, d={DIM}, B={BATCH}, keys {name}, "
            f"chunk_rows {default_chunk_rows(device, variants[name]):,}",
            "queue_infonce", flops / seconds / 1e9, "plain torch.mm, same products over float32 keys",
            mm_rate / 1e9, "GFLOP/s", target=0.70,
            note=f"counted 4*B*N*d = {flops / 1e9:.1f} GFLOP per step (2BNd logits + 2BNd weighted key sum); "
                 f"{seconds * 1e3:.1f} ms/step, median of {len(times[name])} rounds interleaved with the reference "
                 f"(each timed call right after an untimed one of the same job); "
                 f"reference = best of " + ", ".join(f"chunk {c:,}: {r / 1e9:.1f}" for c, r in mm_rates.items())
                 + f" GFLOP/s; {memory} (queue {rows * DIM * 2 / 2**20:.0f} MiB as float16)"))
    path.unlink()
    return {"figures": figures}


def bench_queue_memory(args, scale, work: Path) -> dict:
    import numpy as np
    import torch

    from eimctl.losses import default_chunk_rows, queue_infonce
    from eimctl.queue_store import open_queue

    device = torch.device(args.device)
    rows = scale["memory_rows"]
    path = work / "kt.parquet"
    t0 = time.perf_counter()
    # Written by a child process, so its Arrow buffers and page-cache writes are not in this process's RSS.
    subprocess.run([sys.executable, __file__, "--child", "_write-queue", "--work", str(work),
                    "--rows", str(rows)], check=True)
    write_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    # The "model": everything a training process holds before it maps the queue, kernels warmed on a tiny queue.
    query = torch.randn(BATCH, DIM, device=device, requires_grad=True)
    positive = torch.randint(rows, (BATCH,))
    small = np.stack(list(_random_unit_rows(256, DIM))[0]).astype(np.float16)
    queue_infonce(query, small, positive % 256).backward()
    baseline = _proc_status()
    keys, info = open_queue(path, expect_rows=rows)
    queue_bytes = rows * DIM * np.dtype(info.dtype).itemsize
    figures = []
    default_chunk = default_chunk_rows(device)
    for chunk in sorted({default_chunk, 16_384, 65_536}):
        peak_ok = _reset_peak_rss()
        for _ in range(2):
            queue_infonce(query, keys, positive, chunk_rows=chunk).backward()
            query.grad = None
        after = _proc_status()
        steady = after["VmRSS"] - baseline["VmRSS"]
        peak = (after["VmHWM"] if peak_ok else after["VmRSS"]) - baseline["VmRSS"]
        figures.append(_figure(
            f"Queue memory: {rows:,} x {DIM} {info.dtype} queue memory-mapped (eim.queue_placement=host), peak "
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
                 + (f"; write_queue + sidecar took {write_seconds:.0f} s" if chunk == default_chunk else "")))
    shutil.rmtree(work, ignore_errors=True)
    return {"figures": figures}


def _write_queue_child(work: Path, rows: int) -> None:
    import numpy as np

    from eimctl.queue_store import open_queue, write_queue
    path = work / "kt.parquet"
    write_queue(path, _random_unit_rows(rows, DIM), [f"s{i}" for i in range(rows)], encoder="random",
                field="bench", normalised=True, dtype="float16", data_fingerprint="bench")
    open_queue(path, expect_rows=rows)  # builds the memory-mappable sidecar
    del np


def bench_generate(args, scale, work: Path) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from eimctl.demo.pretrain import DEFAULT_LM_CFG
    from eimctl.generate import generate_captions, generate_captions_naive

    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab = 256
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, initializer_range=0.2, **DEFAULT_LM_CFG)).to(device).eval()
    prefix = torch.randn(32, 10, DEFAULT_LM_CFG["n_embd"], device=device)
    tokens = scale["gen_tokens"]
    never = vocab + 1  # an eos id the LM cannot produce: every caption runs to max_new_tokens
    outputs = {}

    def fast():
        outputs["fast"] = generate_captions(lm, prefix, eos_token_id=never, max_new_tokens=tokens)

    def naive():
        outputs["naive"] = generate_captions_naive(lm, prefix, eos_token_id=never, max_new_tokens=tokens)

    fast()
    fast_times, naive_times = [], []
    for _ in range(2):  # interleaved, so both see the same background load
        for _ in range(3):
            fast_times.append(_timed(fast, device, min_reps=1, min_seconds=0.0, warmup=0))
        naive_times.append(_timed(naive, device, min_reps=1, min_seconds=0.0, warmup=0))
    fast_s, naive_s = statistics.median(fast_times), statistics.median(naive_times)
    same = outputs["fast"] == outputs["naive"]
    rows_differ = sum(a != b for a, b in zip(outputs["fast"], outputs["naive"]))
    n_tok = 32 * tokens
    return {"figures": [
        _figure(f"Caption generation, demo GPT-2 {DEFAULT_LM_CFG}, batch 32, {tokens} tokens each (greedy)",
                "generate_captions (batched, KV cache)", n_tok / fast_s, "generate_captions_naive", n_tok / naive_s,
                "tokens/s", target=10.0, ratio_label="speed-up",
                note=f"identical output tokens: {same} ({rows_differ} of 32 rows differ); median "
                     f"{fast_s:.3f} s vs {naive_s:.2f} s per batch, 2 interleaved rounds")]}


def bench_train_step(args, scale, work: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from eimctl.data.captions import read_split
    from eimctl.models.captioner import Captioner, pad_batch, tokenize_captions
    from eimctl.schedule import stage_spec
    from eimctl.stages.objectives import compute_losses
    from eimctl.stages.runner import set_trainable
    from eimctl.trainer import linear_warmup_decay, train_step

    device = torch.device(args.device)
    cfg = _config(work, args.device)
    torch.manual_seed(0)
    model = Captioner(cfg.model)
    set_trainable(model, stage_spec(cfg.stages, "base"))
    plain = copy.deepcopy(model)
    plain.to(device).train()
    train = read_split(cfg.data, "train")
    ids_list, _ = tokenize_captions(model.tokenizer, [s.caption for s in train.samples[:BATCH]],
                                    cfg.data.max_caption_tokens)
    ids, mask = pad_batch(ids_list, model.tokenizer.pad_token_id)
    with torch.no_grad():
        pixels = torch.randn(BATCH, 3, 64, 64)
        features = model.clip.to(device).encode_images(pixels.to(device))
    batch = {"indices": torch.arange(BATCH), "caption_ids": ids.to(device), "caption_mask": mask.to(device),
             "features": features}

    def eimctl_step_for(precision: str, compiled: bool):
        """The trainer's step (eimctl/trainer.py fit) on the objectives' loss_base, with its speed switches."""
        variant = copy.deepcopy(model).to(device).train()
        if compiled:
            variant.compile_for_training()
        params = [p for p in variant.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(10, 10_000))
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def step():
            with autocast:
                named = compute_losses(variant, batch, {"base": 1.0}, {}, cfg.eim)
            train_step(named, {"loss_base": 1.0}, optimizer, scheduler, params, 0.0, 0)
        return step

    # Plain PyTorch: the same modules, the loss written out by hand, float32.
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(plain_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    caption_ids, caption_mask = batch["caption_ids"], batch["caption_mask"].float()

    def plain_step():
        prefix = plain.projector(features)
        embeds = torch.cat([prefix, plain.lm.get_input_embeddings()(caption_ids)], dim=1)
        logits = plain.lm(inputs_embeds=embeds).logits[:, prefix.shape[1] - 1:-1]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), caption_ids.reshape(-1), reduction="none")
        loss = (losses * caption_mask.reshape(-1)).sum() / caption_mask.sum()
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()
        loss.item()

    variants = {"fp32": eimctl_step_for("fp32", False), "bf16": eimctl_step_for("bf16", False)}
    if device.type == "cuda" or args.scale == "full":  # compiling costs ~30 s on a 2-core CPU
        variants["fp32 + compile"] = eimctl_step_for("fp32", True)
    steps = scale["train_steps"]
    for fn in (plain_step, *variants.values()):
        for _ in range(3):  # warm-up; compiles the compiled variant
            fn()
    rates = {name: [] for name in ("plain", *variants)}
    for _ in range(scale["train_rounds"]):  # interleaved, so all see the same background load
        for name, fn in (("plain", plain_step), *variants.items()):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            rates[name].append(BATCH * steps / (time.perf_counter() - t0))
    base = statistics.median(rates["plain"])
    labels = {"fp32": "float32 (the default)", "bf16": "train.precision=bf16 (autocast)",
              "fp32 + compile": "train.compile=true"}
    figures = []
    for name in variants:
        figures.append(_figure(
            f"Training step (loss_base + AdamW), ClipCap MLP prefix 10 + demo GPT-2, batch {BATCH}, {labels[name]}",
            f"eimctl base step, {labels[name]}", statistics.median(rates[name]), "plain PyTorch fp32 loop", base,
            "samples/s", target=1.0 if name == "fp32" else None,
            note=f"median of {scale['train_rounds']} interleaved rounds of {steps} steps; sequence length "
                 f"{10 + ids.shape[1]}"))
    return {"figures": figures}


def bench_feature_cache(args, scale, work: Path) -> dict:
    from eimctl.stages.runner import run

    times = {False: [], True: []}
    for round_ in range(scale["cache_rounds"]):  # interleaved rounds, so both see the same background load
        for cache in (False, True) if round_ % 2 == 0 else (True, False):
            cfg = _config(work, args.device, "train.epochs=1", "train.log_every=1000",
                          "train.checkpoint_every=100000", f"train.feature_cache={'true' if cache else 'false'}")
            run_dir = work / f"run-cache-{cache}"
            t0 = time.perf_counter()
            run(cfg, run_dir, "base", force=True, show=False)
            times[cache].append(time.perf_counter() - t0)
            shutil.rmtree(run_dir, ignore_errors=True)  # the cache lives in the run dir: each run encodes anew
    times = {k: statistics.median(v) for k, v in times.items()}
    samples = 2 * scale["images"]
    return {"figures": [
        _figure(f"Training epoch, stage base, {samples} samples ({scale['images']} images), demo CLIP + GPT-2",
                "feature cache (encode each image once)", samples / times[True],
                "encode images every step", samples / times[False], "samples/s", ratio_label="speed-up",
                note=f"end to end `train-stage base` incl. model load and, with the cache, encoding every image once: "
                     f"{times[True]:.1f} s vs {times[False]:.1f} s (median of {scale['cache_rounds']} "
                     f"interleaved rounds)")]}


def bench_build_queues(args, scale, work: Path) -> dict:
    import torch

    from eimctl import build_queues as bq
    from eimctl.data.captions import read_split
    from eimctl.models.captioner import pad_batch, tokenize_captions
    from eimctl.models.clip import ClipEncoder
    from eimctl.models.lm import load_lm

    device = torch.device(args.device)
    cfg = _config(work, args.device)
    train = read_split(cfg.data, "train")
    # Cycle the demo captions up to the benchmark's row count (rows only need captions here).
    train.samples[:] = [train.samples[i % len(train.samples)] for i in range(scale["queue_rows"])]
    rows = len(train.samples)
    clip = ClipEncoder(cfg.model.clip).to(device).eval()
    lm, tokenizer = load_lm(cfg.model.lm)
    lm.to(device).eval()
    pad = tokenizer.pad_token_id
    token_ids, _ = tokenize_captions(tokenizer, [s.caption for s in train.samples], cfg.data.max_caption_tokens)
    batches = [(b, min(rows, b + bq.BATCH)) for b in range(0, rows, bq.BATCH)]
    text_ids = [clip.tokenizer([s.caption for s in train.samples[b:e]]).to(device) for b, e in batches]
    padded = [tuple(t.to(device) for t in pad_batch(token_ids[b:e], pad)) for b, e in batches]
    raw = {
        "kt": lambda: [clip.model.encode_text(t) for t in text_ids],
        "ke": lambda: [lm.get_input_embeddings()(i) for i, _ in padded],
        "kb": lambda: [lm.base_model(input_ids=i, attention_mask=m).last_hidden_state for i, m in padded],
    }
    # Worker processes tokenise ahead of the encoder when there are cores to spare (train.num_workers).
    workers = 0 if (os.cpu_count() or 1) < 4 else min(8, (os.cpu_count() or 1) - 2)
    figures, total_eim, total_raw = [], 0.0, 0.0
    for name in bq.QUEUES:
        parts = work / f"parts-{name}"

        def build():
            shutil.rmtree(parts, ignore_errors=True)
            parts.mkdir()
            bq._build_parts(name, parts, clip, lm, train, token_ids, pad, device, False, workers)

        def raw_forward():
            with torch.no_grad():
                raw[name]()

        raw_forward()
        build()
        raw_times, eim_times = [], []
        for _ in range(scale["queue_rounds"]):  # interleaved, so both see the same background load
            for fn, out in ((raw_forward, raw_times), (build, eim_times)):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                out.append(time.perf_counter() - t0)
        raw_s, eim_s = statistics.median(raw_times), statistics.median(eim_times)
        shutil.rmtree(parts, ignore_errors=True)
        total_eim += eim_s
        total_raw += raw_s
        figures.append(_figure(f"build-queues {name}: {rows} rows, batches of {bq.BATCH} (no target: part of the "
                               "figure above)", "eimctl _build_parts", rows / eim_s, "raw encoder forward",
                               rows / raw_s, "rows/s",
                               note="ke's raw side is an embedding lookup, so its fixed costs (padding, pooling, "
                                    "writing) dominate its ratio while adding little to the total"
                               if name == "ke" else ""))
    figures.insert(0, _figure(f"build-queues, all three queues (kt, ke, kb), {rows} rows, train.num_workers={workers}",
                              "eimctl _build_parts", 3 * rows / total_eim, "raw encoder forward",
                              3 * rows / total_raw, "rows/s", target=0.90,
                              note="eimctl's rows/s include tokenisation, padding, L2 normalisation, the copy to "
                                   "NumPy and writing the .npy parts; the raw side is the encoder forward on "
                                   "pre-tokenised batches (kt: CLIP encode_text, ke: the LM's embedding layer, "
                                   "kb: the LM's base model)"))
    return {"figures": figures}


CHILDREN = {"infonce": bench_infonce, "queue-memory": bench_queue_memory, "generate": bench_generate,
            "train-step": bench_train_step, "feature-cache": bench_feature_cache,
            "build-queues": bench_build_queues}
NEEDS_WORKSPACE = {"train-step", "feature-cache", "build-queues"}


# ----------------------------------------------------------------------------- parent

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


def _machine_key(info: dict) -> str:
    return f"{info['cpu']}, {info['cores']} cores, {info['gpu'] or 'no GPU'}"


def format_figure(fig: dict) -> list[str]:
    ratio = fig["ratio"]
    ratio_text = f"{ratio * 100:.0f}%" if fig["ratio_label"] == "ratio" and fig["target"] is not None and \
        fig["target"] <= 1.1 and fig["unit"] != "MiB" else f"{ratio:.2f}x"
    if fig["unit"] == "MiB":
        ratio_text = f"{ratio:.3f}x"
    target = ""
    if fig["target"] is not None:
        shown = f"{fig['target'] * 100:.0f}%" if ratio_text.endswith("%") else f"{fig['target']}x"
        target = f"  target {fig['target_op']} {shown}: {'MET' if fig['met'] else 'NOT MET'}"
    lines = [f"* {fig['title']}",
             f"    {fig['a_label']}: {fig['a']:,.2f} {fig['unit']}",
             f"    {fig['b_label']}: {fig['b']:,.2f} {fig['unit']}",
             f"    {fig['ratio_label']}: {ratio_text}{target}"]
    if fig["note"]:
        lines.append(f"    ({fig['note']})")
    return lines


def write_results(path: Path, info: dict, results: dict, args) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    key = f"{_machine_key(info)}, scale {args.scale}" + (f", only {' '.join(args.only)}" if args.only else "")
    body = [f"## {key}", "",
            f"Run {stamp}; scale `{args.scale}`, device `{args.device}`; torch {info['torch']}, "
            f"{info['torch_threads']} torch threads, Python {info['python']}, {info['memory_gib']} GiB RAM; "
            f"load average at start {info['load_average']}.", "", "```"]
    for name, result in results.items():
        body.append(f"[{name}]")
        if "error" in result:
            body.append(f"    failed: {result['error']}")
        for fig in result.get("figures", []):
            body.extend(format_figure(fig))
    body += ["```", ""]
    header = "# eimctl benchmark results\n\nWritten by `benchmarks/run.py` (`make bench`); one section per " \
             "machine, scale and selection, the latest run only. Timings on shared machines are noisy.\n\n"
    sections = []
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        for chunk in text.split("\n## ")[1:]:
            if not chunk.startswith(key + "\n"):
                sections.append("## " + chunk.rstrip() + "\n")
    sections.append("\n".join(body))
    path.write_text(header + "\n".join(sections), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default=os.environ.get("EIMCTL_BENCH_SCALE", "small"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = SCALES[args.scale]

    if args.child == "_write-queue":
        _write_queue_child(args.work, args.rows)
        return 0
    if args.child:
        result = CHILDREN[args.child](args, scale, args.work)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    info = machine()
    print(f"machine: {info['cpu']}; {info['cores']} cores ({info['torch_threads']} torch threads); "
          f"GPU: {info['gpu'] or 'none'}; torch {info['torch']}; {info['memory_gib']} GiB RAM; "
          f"load average {info['load_average']}")
    print(f"scale: {args.scale} ({scale}); device: {args.device}\n", flush=True)
    selected = args.only or list(BENCHMARKS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ecb-") as tmp:
        tmp = Path(tmp)
        if NEEDS_WORKSPACE & set(selected):
            t0 = time.perf_counter()
            prepare_workspace(tmp / "workspace", scale)
            print(f"(workspace: demo data + random demo CLIP/GPT-2 in {time.perf_counter() - t0:.0f} s)\n", flush=True)
        for name in selected:
            work = tmp / "workspace" if name in NEEDS_WORKSPACE else tmp / name
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--scale", args.scale,
                                   "--device", args.device, "--work", str(work)],
                                  capture_output=True, text=True)
            line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                results[name] = {"error": f"exit {proc.returncode}: {tail[0]}"}
            else:
                results[name] = json.loads(line[len("RESULT "):])
            print(f"[{name}] ({time.perf_counter() - t0:.0f} s)")
            if "error" in results[name]:
                print(f"    failed: {results[name]['error']}")
            for fig in results[name].get("figures", []):
                print("\n".join(format_figure(fig)))
            print(flush=True)
    if not args.no_write:
        write_results(args.results, info, results, args)
        print(f"results written to {args.results}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
