#!/usr/bin/env python
"""eimctl benchmarks: each figure compares eimctl's code path with a plain baseline on the same machine.

    .venv/bin/python benchmarks/run.py                 # CPU-sized defaults (a few minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --scale full    # COCO-scale InfoNCE (N = 566,747) and larger runs
    .venv/bin/python benchmarks/run.py --only generate infonce   # a subset
    EIMCTL_BENCH_SCALE=full make bench

Every benchmark (benchmarks/bench_<name>.py, its `run(args, scale, work)`) runs in its own
child process (so resident-memory figures start from a clean process), on CUDA when it is
available (`--device cpu` forces the CPU). Models have random weights and the data set is
generated on the fly in a temporary folder; nothing is downloaded. Results are printed and
written to benchmarks/RESULTS.md (one section per machine, the latest run replacing the
previous one for that machine).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SCALES, machine, machine_key

# name -> module, in the order they run
BENCHMARKS = {"infonce": "bench_infonce", "queue-memory": "bench_queue_memory", "generate": "bench_generate",
              "train-step": "bench_train_step", "build-queues": "bench_build_queues",
              "feature-cache": "bench_feature_cache"}
NEEDS_WORKSPACE = {"train-step", "feature-cache", "build-queues"}


# ----------------------------------------------------------------------------- figures and RESULTS.md

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


def result_lines(result: dict) -> list[str]:
    """A benchmark's failure or figures, as printed and as written into RESULTS.md."""
    lines = [f"    failed: {result['error']}"] if "error" in result else []
    for fig in result.get("figures", []):
        lines.extend(format_figure(fig))
    return lines


def write_results(path: Path, info: dict, results: dict, args) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    key = f"{machine_key(info)}, scale {args.scale}" + (f", only {' '.join(args.only)}" if args.only else "")
    body = [f"## {key}", "",
            f"Run {stamp}; scale `{args.scale}`, device `{args.device}`; torch {info['torch']}, "
            f"{info['torch_threads']} torch threads, Python {info['python']}, {info['memory_gib']} GiB RAM; "
            f"load average at start {info['load_average']}.", "", "```"]
    for name, result in results.items():
        body.append(f"[{name}]")
        body.extend(result_lines(result))
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


# ----------------------------------------------------------------------------- child processes

def run_child(args) -> int:
    """In a child process: one benchmark (or the queue writer of queue-memory); prints its RESULT line."""
    scale = SCALES[args.scale]
    if args.child == "_write-queue":
        importlib.import_module("bench_queue_memory").write_queue_child(args.work, args.rows)
        return 0
    result = importlib.import_module(BENCHMARKS[args.child]).run(args, scale, args.work)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def spawn(name: str, args, work: Path) -> dict:
    """Run benchmark `name` in a child process; its result, or {"error": ...}."""
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--scale", args.scale,
                           "--device", args.device, "--work", str(work)],
                          capture_output=True, text=True)
    line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(line[len("RESULT "):])


def run_all(args, selected: list[str]) -> dict:
    """Every selected benchmark in its own child process, in a temporary folder; prints as they finish."""
    from workspace import prepare_workspace

    results = {}
    with tempfile.TemporaryDirectory(prefix="ecb-") as tmp:
        tmp = Path(tmp)
        if NEEDS_WORKSPACE & set(selected):
            t0 = time.perf_counter()
            prepare_workspace(tmp / "workspace", SCALES[args.scale])
            print(f"(workspace: demo data + random demo CLIP/GPT-2 in {time.perf_counter() - t0:.0f} s)\n", flush=True)
        for name in selected:
            work = tmp / "workspace" if name in NEEDS_WORKSPACE else tmp / name
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            results[name] = spawn(name, args, work)
            print(f"[{name}] ({time.perf_counter() - t0:.0f} s)")
            for line in result_lines(results[name]):
                print(line)
            print(flush=True)
    return results


# ----------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default=os.environ.get("EIMCTL_BENCH_SCALE", "small"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--only", nargs="*", choices=tuple(BENCHMARKS))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main() -> int:
    args = parse_args()
    if args.child:
        return run_child(args)
    info = machine()
    print(f"machine: {info['cpu']}; {info['cores']} cores ({info['torch_threads']} torch threads); "
          f"GPU: {info['gpu'] or 'none'}; torch {info['torch']}; {info['memory_gib']} GiB RAM; "
          f"load average {info['load_average']}")
    print(f"scale: {args.scale} ({SCALES[args.scale]}); device: {args.device}\n", flush=True)
    results = run_all(args, args.only or list(BENCHMARKS))
    if not args.no_write:
        write_results(args.results, info, results, args)
        print(f"results written to {args.results}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
