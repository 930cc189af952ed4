"""train-step: eimctl's `base` step (objectives + the loop's train_step) vs a plain PyTorch fp32 loop.

Both train the same ClipCap modules (MLP prefix of 10, demo GPT-2) on the same batch of cached
features; eimctl's step is also timed with train.precision=bf16 and (on CUDA or at `full` scale)
train.compile=true. Rounds are interleaved, so all see the same background load.
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from common import BATCH, figure, interleaved_times
from eimctl.data.tokens import pad_batch, tokenize_pairs
from eimctl.eim.objectives import compute_losses
from eimctl.eim.schedule import resolve_schedule, stage_spec
from eimctl.models.factory import build_model, set_trainable
from eimctl.tasks import get_task
from eimctl.train.loop import linear_warmup_decay, train_step
from workspace import bench_config

LABELS = {"fp32": "float32 (the default)", "bf16": "train.precision=bf16 (autocast)",
          "fp32 + compile": "train.compile=true"}


def _model_and_batch(cfg, device: torch.device):
    """The base stage's model, an untouched copy of it for the plain loop, and one batch on the device."""
    spec = stage_spec(resolve_schedule(cfg), "base")
    torch.manual_seed(0)
    model, _ = build_model(cfg, groups=set(spec.trainable), losses=set(spec.losses),
                           trained_now=set(spec.trainable))
    set_trainable(model, cfg.model.family, spec.trainable)
    plain = copy.deepcopy(model)
    plain.to(device).train()
    task = get_task(cfg.data.task)
    train = task.read(cfg.data, "train")
    tokens, _ = tokenize_pairs(model.tokenizer, [task.format(s) for s in train.samples[:BATCH]],
                               cfg.data.max_caption_tokens)
    padded = pad_batch(tokens, model.tokenizer.pad_token_id)
    with torch.no_grad():
        pixels = torch.randn(BATCH, 3, 64, 64)
        features = model.clip.to(device).encode_images(pixels.to(device))
    batch = {"indices": torch.arange(BATCH), **{k: v.to(device) for k, v in padded.items()}, "features": features}
    return model, plain, batch


def _eimctl_step(model, batch: dict, cfg, device: torch.device, precision: str, compiled: bool):
    """The loop's step (eimctl/train/loop.py fit) on the objectives' loss_base, with its speed switches."""
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


def _plain_step(plain, batch: dict, cfg):
    """Plain PyTorch: the same modules, the loss written out by hand, float32."""
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(plain_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    features, caption_ids, caption_mask = batch["features"], batch["input_ids"], batch["loss_mask"].float()

    def step():
        prefix = plain.projector(features)
        embeds = torch.cat([prefix, plain.lm.get_input_embeddings()(caption_ids)], dim=1)
        logits = plain.lm(inputs_embeds=embeds).logits[:, prefix.shape[1] - 1:-1]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), caption_ids.reshape(-1), reduction="none")
        loss = (losses * caption_mask.reshape(-1)).sum() / caption_mask.sum()
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()
        loss.item()
    return step


def run(args, scale: dict, work: Path) -> dict:
    device = torch.device(args.device)
    cfg = bench_config(work, args.device)
    model, plain, batch = _model_and_batch(cfg, device)
    plain_step = _plain_step(plain, batch, cfg)
    variants = {"fp32": _eimctl_step(model, batch, cfg, device, "fp32", False),
                "bf16": _eimctl_step(model, batch, cfg, device, "bf16", False)}
    if device.type == "cuda" or args.scale == "full":  # compiling costs ~30 s on a 2-core CPU
        variants["fp32 + compile"] = _eimctl_step(model, batch, cfg, device, "fp32", True)
    steps = scale["train_steps"]
    for fn in (plain_step, *variants.values()):
        for _ in range(3):  # warm-up; compiles the compiled variant
            fn()
    times = interleaved_times({"plain": plain_step, **variants}, device, scale["train_rounds"], calls=steps)
    rates = {name: statistics.median(BATCH * steps / t for t in seconds) for name, seconds in times.items()}
    figures = []
    for name in variants:
        figures.append(figure(
            f"Training step (loss_base + AdamW), ClipCap MLP prefix 10 + demo GPT-2, batch {BATCH}, {LABELS[name]}",
            f"eimctl base step, {LABELS[name]}", rates[name], "plain PyTorch fp32 loop", rates["plain"],
            "samples/s", target=1.0 if name == "fp32" else None,
            note=f"median of {scale['train_rounds']} interleaved rounds of {steps} steps; sequence length "
                 f"{10 + batch['input_ids'].shape[1]}"))
    return {"figures": figures}
