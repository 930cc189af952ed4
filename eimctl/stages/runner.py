"""`eimctl train-stage <stage>`: train one stage of the schedule (eimctl/schedule.py).

    eimctl train-stage st      --run-dir runs/eim --config examples/demo-eim.yaml
    eimctl train-stage lm      --run-dir runs/eim --config examples/demo-eim.yaml
    eimctl train-stage base-ie --run-dir runs/eim --config examples/demo-eim.yaml
    eimctl train-stage base    --run-dir runs/base --config examples/demo.yaml   # plain ClipCap

A stage starts from its `init` (the pretrained models, or another stage's final
weights, which must be complete and from the same config), trains only its own
modules with its own losses, and saves every tensor trained so far in
`final/trainable.safetensors`. When CLIP is frozen in a stage, each image is
encoded once (train.feature_cache).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from eimctl.atomic import write_text
from eimctl.build_queues import queue_folder, require_queues
from eimctl.checkpoint import WEIGHTS, load_weights, save_weights
from eimctl.config import Config, config_fingerprint, dump_yaml, fingerprint, load_config, to_dict
from eimctl.data.captions import read_split
from eimctl.errors import EimError
from eimctl.features import ImageDataset, cached_features, check_images
from eimctl.models.captioner import Captioner, pad_batch, tokenize_split
from eimctl.progress import log
from eimctl.rundir import check_not_foreign, require_upstream, stage_dir, write_manifest
from eimctl.schedule import StageSpec, resolve_schedule, stage_spec
from eimctl.stages.objectives import compute_losses
from eimctl.trainer import fit, resolve_device

MODULE_PREFIXES = {"projector": "projector.", "lm": "lm.", "clip_prompts": "clip.prompts", "ie_head": "clip.ie_head."}


def build_model(config: Config, weights: Path | None = None) -> tuple[Captioner, set[str]]:
    """The captioner this config's schedule needs, with `weights` loaded; also the loaded tensor names."""
    specs = resolve_schedule(config.stages).values()
    prompts = config.eim.prompt_tokens if any("clip_prompts" in s.trainable for s in specs) else 0
    ie_head = config.eim.ie_query == "linear-head" and any("ie" in s.losses for s in specs)
    model = Captioner(config.model, prompt_tokens=prompts, ie_head=ie_head)
    loaded: set[str] = set()
    if weights is not None:
        load_weights(model, weights)
        loaded = set(load_file(weights).keys())
        model.clip.prompts_active = "clip.prompts" in loaded
    return model, loaded


def set_trainable(model: Captioner, spec: StageSpec) -> None:
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if any(name.startswith(MODULE_PREFIXES[m]) for m in spec.trainable):
            param.requires_grad_(True)
    if "clip_prompts" in spec.trainable:
        if model.clip.prompts is None:
            raise EimError(f"stage '{spec.name}' trains clip_prompts but eim.prompt_tokens=0",
                           where="config", hint="set eim.prompt_tokens to e.g. 8")
        model.clip.prompts_active = True
    if "ie_head" in spec.trainable and model.clip.ie_head is None:
        raise EimError(f"stage '{spec.name}' trains ie_head but eim.ie_query is not linear-head",
                       where="config", hint="set eim.ie_query=linear-head")


def check_queue_widths(model: Captioner, queues: dict, folder: Path) -> None:
    """Each queue's key width must be what its query will have, before any training starts."""
    widths = {"kt": model.clip.embed_dim, "ke": model.lm_dim, "kb": model.lm_dim}
    for name, keys in queues.items():
        if keys.shape[1] != widths[name]:
            raise EimError(f"key queue '{name}' has width {keys.shape[1]}, but this model's {name} query has "
                           f"width {widths[name]}", where=str(folder / f"{name}.parquet"),
                           hint="rebuild the queues for this model: eimctl build-queues --force <same config>")


def place_queues(queues: dict, placement: str, device: torch.device, dtype: str, show: bool) -> dict:
    """Keep the memory-mapped queues (host), or copy each once into the training device's memory (device).

    On a GPU, streaming a COCO-size queue over PCIe every step would cost more than the whole step
    (`make bench`), so `auto` copies it there, as `dtype` (566,747 x 768 keys: 1.6 GiB in float32,
    830 MiB in float16); on a CPU `auto` keeps the memmap."""
    if placement == "host" or (placement == "auto" and device.type != "cuda") or not queues:
        return queues
    placed = {}
    for name, keys in queues.items():
        try:
            tensor = torch.empty(keys.shape, dtype=getattr(torch, dtype), device=device)
            for start in range(0, len(keys), 65_536):
                block = torch.from_numpy(np.ascontiguousarray(keys[start:start + 65_536]))
                tensor[start:start + len(block)].copy_(block)
        except torch.OutOfMemoryError:
            raise EimError(f"key queue '{name}' ({keys.shape[0]:,} x {keys.shape[1]} {dtype}) does not fit in "
                           f"{device} memory", hint="set eim.device_queue_dtype=float16 to halve it, or "
                           "eim.queue_placement=host to stream it from the memory-mapped file") from None
        placed[name] = tensor
    log(f"key queues copied to {device}: " + ", ".join(f"{n} {tuple(k.shape)}" for n, k in placed.items()), show)
    return placed


def stage_config(config: Config, spec: StageSpec) -> Config:
    """The config with the stage's own `train:` overrides applied."""
    return load_config(base=to_dict(config), overrides=[f"train.{k}={v}" for k, v in spec.train.items()])


def run(config: Config, run_dir: Path, stage: str, *, force: bool = False, resume: str = "auto",
        show: bool = True) -> Path:
    started = time.time()
    spec = stage_spec(config.stages, stage)
    config_fp = config_fingerprint(config)
    out = stage_dir(run_dir, stage)
    if check_not_foreign(out, f"stage '{stage}'", config_fp, force) == "skip":
        log(f"stage '{stage}' is already complete in {out} (same config) — skipping; --force retrains it", show)
        return out
    init_weights = None
    if spec.init != "pretrained":
        init_dir = stage_dir(run_dir, spec.init)
        require_upstream(init_dir, f"stage '{spec.init}' (which '{stage}' starts from)",
                         f"eimctl train-stage {spec.init} --run-dir {run_dir} <same config>", {"config": config_fp})
        init_weights = init_dir / "final" / WEIGHTS
    train = read_split(config.data, "train")
    queues = require_queues(config, train, spec.queues) if spec.queues else {}
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = stage_config(config, spec)
    write_text(out / "config.yaml", dump_yaml(cfg))

    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model, inherited = build_model(cfg, init_weights)
    set_trainable(model, spec)
    check_queue_widths(model, queues, queue_folder(config, train))
    queues = place_queues(queues, cfg.eim.queue_placement, device, cfg.eim.device_queue_dtype, show)
    if cfg.train.compile:
        model.compile_for_training()
    captions = tokenize_split(model.tokenizer, train, cfg.data, show)
    pad_id = model.tokenizer.pad_token_id
    clip_trains = any(p.requires_grad for p in model.clip.parameters())

    if cfg.train.feature_cache and not clip_trains:
        features, image_row = cached_features(model.clip.to(device), cfg.model.clip, train, cfg.data,
                                              run_dir / "cache", device, cfg.train.num_workers, show)
        sample_rows = [image_row[s.image_id] for s in train.samples]

        def images_for(indices: list[int]) -> dict:
            return {"features": torch.from_numpy(features[[sample_rows[i] for i in indices]].copy())}
    else:
        check_images(train, cfg.data)
        pixels = ImageDataset(train.image_root, [s.image for s in train.samples], model.clip.preprocess,
                              cfg.data.allow_outside_root)

        def images_for(indices: list[int]) -> dict:
            return {"pixels": torch.stack([pixels[i] for i in indices])}

    def collate(indices: list[int]) -> dict:
        ids, mask = pad_batch([captions[i] for i in indices], pad_id)
        return {"indices": torch.tensor(indices), "caption_ids": ids, "caption_mask": mask, **images_for(indices)}

    def losses(batch: dict) -> dict:
        return compute_losses(model, batch, spec.losses, queues, cfg.eim)

    summary = fit(stage=stage, model=model, losses=losses, collate=collate, dataset_size=len(train.samples),
                  cfg=cfg.train, out_dir=out, config_fp=config_fp, device=device, resume=resume, show=show,
                  weights={f"loss_{k}": v for k, v in spec.losses.items()})
    trained = {n for n, p in model.named_parameters() if p.requires_grad} | inherited
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n in trained}
    (out / "final").mkdir(exist_ok=True)
    save_weights(out / "final" / WEIGHTS, tensors, {"stage": stage, "config": config_fp})
    write_manifest(out, step="train-stage", config=to_dict(config), started=started,
                   fingerprints={"config": config_fp, "model": fingerprint(to_dict(config.model)),
                                 "data": train.fingerprint},
                   outputs=["config.yaml", "metrics.jsonl", f"final/{WEIGHTS}"],
                   extra={"stage": stage, "init": spec.init, "trainable": list(spec.trainable),
                          "losses": spec.losses, "summary": summary, "device": str(device)})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # final/ holds the result now
    log(f"stage '{stage}' complete: {summary['steps']} steps, final loss {summary['final_loss']:.4f} -> {out}", show)
    return out
