"""`eimctl evaluate coco`: caption the test images of a trained stage and score them.

    eimctl evaluate coco --run-dir runs/demo --stage base

Batched, KV-cached generation (greedy or beam); predictions in the COCO results
format; BLEU-1..4, METEOR, ROUGE_L, CIDEr (and SPICE when CoreNLP jars are given)
from pycocoevalcap; optionally the best single fixed caption as a floor to beat.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from eimctl.checkpoint import WEIGHTS
from eimctl.config import Config, fingerprint, load_config
from eimctl.data.captions import read_split
from eimctl.evaluate.caption_metrics import best_fixed_caption, score_captions, write_coco_results
from eimctl.features import cached_features
from eimctl.generate import generate_captions
from eimctl.models.captioner import Captioner
from eimctl.stages.runner import build_model
from eimctl.progress import StepProgress, log
from eimctl.rundir import complete_manifest, eval_dir, require_upstream, stage_dir, write_manifest
from eimctl.atomic import write_json
from eimctl.errors import EimError
from eimctl.trainer import resolve_device

BENCHMARK = "coco"


def load_trained(run_dir: Path, stage: str, overrides: list[str] | None = None) -> tuple[Config, Captioner, dict]:
    folder = stage_dir(run_dir, stage)
    for item in overrides or []:
        if not item.startswith(("eval.", "train.device=")):
            raise EimError(f"evaluate accepts eval.* and train.device overrides only, not '{item}'",
                           hint="model and data come from the trained stage's manifest")
    manifest = require_upstream(folder, f"stage '{stage}'", f"eimctl train-stage {stage} --run-dir {run_dir}")
    config = load_config(base=manifest["config"], overrides=overrides)
    model, _ = build_model(config, folder / "final" / WEIGHTS)
    model.eval()
    return config, model, manifest


def fixed_caption_floor(train_captions: list[str], references: dict, count: int) -> dict:
    """The single most-scoring caption among the `count` most frequent training captions."""
    candidates = [c for c, _ in Counter(c.strip().lower() for c in train_captions).most_common(count)]
    floor = {}
    for metric in ("Bleu_4", "CIDEr"):
        caption, score = best_fixed_caption(candidates, references, metric)
        floor[metric] = {"caption": caption, "score": score}
    return floor


def run(run_dir: Path, stage: str, *, overrides: list[str] | None = None, spice_jars: Path | None = None,
        force: bool = False, show: bool = True) -> Path:
    started = time.time()
    config, model, upstream = load_trained(run_dir, stage, overrides)
    ev = config.eval
    out = eval_dir(run_dir, stage, BENCHMARK)
    fp = {"upstream": fingerprint(upstream["fingerprints"]), "eval": fingerprint(vars(ev)),
          "spice": str(spice_jars or "")}
    existing = complete_manifest(out)
    if existing and not force and existing.get("fingerprints") == fp:
        log(f"evaluation already complete in {out} — skipping; --force reruns it", show)
        return out
    if out.exists():
        shutil.rmtree(out)
    device = resolve_device(config.train.device)
    model.to(device)
    split = read_split(config.data, ev.split)
    features, rows = cached_features(model.clip, config.model.clip, split, config.data, run_dir / "cache",
                                     device, show=show)
    images = split.images()
    eos = model.tokenizer.eos_token_id
    predictions: dict[str, str] = {}
    progress = StepProgress(f"caption {ev.split} images", len(images), log_every=max(1, len(images) // 5),
                            enabled=show)
    for start in range(0, len(images), ev.batch_size):
        chunk = images[start:start + ev.batch_size]
        batch = torch.from_numpy(features[[rows[i] for i, _ in chunk]].copy()).to(device)
        with torch.inference_mode():
            prefix = model.prefix(batch)
        tokens = generate_captions(model.lm, prefix, eos_token_id=eos, max_new_tokens=ev.max_new_tokens,
                                   beam_size=ev.beam_size)
        for (image_id, _), ids in zip(chunk, tokens):
            predictions[image_id] = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
        progress.update(min(start + ev.batch_size, len(images)))
    progress.close()

    references = split.references()
    scores = score_captions(predictions, references, spice_jars=spice_jars)
    result = {"benchmark": BENCHMARK, "stage": stage, "split": ev.split, "beam_size": ev.beam_size,
              "metrics": scores["metrics"], "unavailable": scores.get("unavailable", {}),
              "n_images": len(images)}
    if ev.fixed_caption_baseline:
        train = read_split(config.data, "train")
        result["fixed_caption_baseline"] = fixed_caption_floor([s.caption for s in train.samples], references,
                                                               ev.fixed_caption_candidates)
    out.mkdir(parents=True, exist_ok=True)
    write_coco_results(out / "predictions.json", predictions)
    result["wall_seconds"] = round(time.time() - started, 3)
    write_json(out / "metrics.json", result)
    write_manifest(out, step="evaluate", config={"eval": vars(ev)}, fingerprints=fp, started=started,
                   outputs=["predictions.json", "metrics.json"], extra={"stage": stage, "benchmark": BENCHMARK})
    return out
