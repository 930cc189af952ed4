"""feature-cache: one epoch of `train-stage base` with the frozen-CLIP feature cache vs encoding every step.

End to end through the public step function (model load included). The cache lives in the
run folder, so every run gets a fresh folder and encodes anew; rounds are interleaved, in
alternating order, so both see the same background load.
"""
from __future__ import annotations

import itertools
import shutil
import statistics
from pathlib import Path

from common import figure, interleaved_times
from eimctl.steps.train_stage import train_stage
from workspace import bench_config


def run(args, scale: dict, work: Path) -> dict:
    configs = {cache: bench_config(work, args.device, "train.epochs=1", "train.log_every=1000",
                                   "train.checkpoint_every=100000",
                                   f"train.feature_cache={'true' if cache else 'false'}")
               for cache in (False, True)}
    runs = itertools.count()

    def epoch(cache: bool) -> None:
        train_stage(configs[cache], work / f"run-cache-{cache}-{next(runs)}", "base", force=True, show=False)

    times = interleaved_times({cache: (lambda cache=cache: epoch(cache)) for cache in (False, True)},
                              None, scale["cache_rounds"], alternate=True)
    for run_dir in work.glob("run-cache-*"):
        shutil.rmtree(run_dir, ignore_errors=True)
    times = {k: statistics.median(v) for k, v in times.items()}
    samples = 2 * scale["images"]
    return {"figures": [
        figure(f"Training epoch, stage base, {samples} samples ({scale['images']} images), demo CLIP + GPT-2",
               "feature cache (encode each image once)", samples / times[True],
               "encode images every step", samples / times[False], "samples/s", ratio_label="speed-up",
               note=f"end to end `train-stage base` incl. model load and, with the cache, encoding every image once: "
                    f"{times[True]:.1f} s vs {times[False]:.1f} s (median of {scale['cache_rounds']} "
                    f"interleaved rounds)")]}
