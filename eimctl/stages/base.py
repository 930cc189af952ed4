"""Stage `base`: the original ClipCap recipe. CLIP frozen; projector + LM trained by loss_base.

    eimctl train-stage base --run-dir runs/demo --config examples/demo.yaml

With CLIP frozen, each image is encoded once into a feature cache (train.feature_cache).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from eimctl.atomic import write_text
from eimctl.checkpoint import WEIGHTS, save_weights, trainable_tensors
from eimctl.config import Config, config_fingerprint, dump_yaml, fingerprint, to_dict
from eimctl.data.captions import read_split
from eimctl.features import ImageDataset, cached_features, check_images
from eimctl.models.captioner import Captioner, pad_batch, tokenize_captions
from eimctl.progress import log
from eimctl.rundir import check_not_foreign, stage_dir, write_manifest
from eimctl.trainer import fit, resolve_device
from eimctl.errors import EimError

STAGE = "base"


def model_fingerprint(config: Config) -> str:
    return fingerprint(to_dict(config.model))


def captions_for_training(tokenizer, split, config: Config, show: bool) -> list[list[int]]:
    ids, truncated = tokenize_captions(tokenizer, [s.caption for s in split.samples],
                                       config.data.max_caption_tokens)
    if truncated and config.data.overlong == "refuse":
        first = next(s for s, i in zip(split.samples, ids) if len(i) == config.data.max_caption_tokens)
        raise EimError(f"{truncated} captions exceed data.max_caption_tokens={config.data.max_caption_tokens}",
                       where=f"sample {first.sample_id}",
                       hint="raise data.max_caption_tokens, or set data.overlong=truncate")
    if truncated:
        log(f"warning: {truncated} captions longer than {config.data.max_caption_tokens} tokens were truncated",
            show)
    return ids


def run(config: Config, run_dir: Path, *, force: bool = False, resume: str = "auto", show: bool = True) -> Path:
    started = time.time()
    out = stage_dir(run_dir, STAGE)
    config_fp = config_fingerprint(config)
    action = check_not_foreign(out, f"stage '{STAGE}'", config_fp, force)
    if action == "skip":
        log(f"stage '{STAGE}' is already complete in {out} (same config) — skipping; --force retrains it", show)
        return out
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_yaml(config))

    device = resolve_device(config.train.device)
    train = read_split(config.data, "train")
    torch.manual_seed(config.train.seed)
    model = Captioner(config.model)
    model.clip.requires_grad_(False)
    captions = captions_for_training(model.tokenizer, train, config, show)
    image_row = {image_id: row for row, (image_id, _) in enumerate(train.images())}
    sample_rows = [image_row[s.image_id] for s in train.samples]
    pad_id = model.tokenizer.pad_token_id

    if config.train.feature_cache:
        features, _ = cached_features(model.clip, config.model.clip, train, config.data, run_dir / "cache",
                                      device, config.train.num_workers, show)

        def collate(indices: list[int]) -> dict:
            ids, mask = pad_batch([captions[i] for i in indices], pad_id)
            rows = [sample_rows[i] for i in indices]
            return {"indices": torch.tensor(indices), "features": torch.from_numpy(features[rows].copy()),
                    "caption_ids": ids, "caption_mask": mask}
    else:
        check_images(train, config.data)
        images = ImageDataset(train.image_root, [s.image for s in train.samples], model.clip.preprocess,
                              config.data.allow_outside_root)

        def collate(indices: list[int]) -> dict:
            ids, mask = pad_batch([captions[i] for i in indices], pad_id)
            return {"indices": torch.tensor(indices), "pixels": torch.stack([images[i] for i in indices]),
                    "caption_ids": ids, "caption_mask": mask}

    def losses(batch: dict) -> dict:
        features = batch.get("features")
        if features is None:
            with torch.no_grad():
                features = model.clip.encode_images(batch["pixels"])
        return {"loss_base": model.loss_base(features, batch["caption_ids"], batch["caption_mask"])}

    summary = fit(stage=STAGE, model=model, losses=losses, collate=collate, dataset_size=len(train.samples),
                  cfg=config.train, out_dir=out, config_fp=config_fp, device=device, resume=resume, show=show)
    (out / "final").mkdir(exist_ok=True)
    save_weights(out / "final" / WEIGHTS, trainable_tensors(model), {"stage": STAGE, "config": config_fp})
    write_manifest(out, step="train-stage", config=to_dict(config), started=started,
                   fingerprints={"config": config_fp, "model": model_fingerprint(config), "data": train.fingerprint},
                   outputs=["config.yaml", "metrics.jsonl", f"final/{WEIGHTS}"],
                   extra={"stage": STAGE, "summary": summary, "device": str(device)})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # final/ holds the result now
    log(f"stage '{STAGE}' complete: {summary['steps']} steps, final loss {summary['final_loss']:.4f} -> {out}", show)
    return out
