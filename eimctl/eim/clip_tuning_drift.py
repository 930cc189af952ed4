"""How far loss_IE's CLIP tuning module moves what the rest of the model sees, measured by switching it off.

A stage that trains the module measures, once before training and once after, on a fixed sample of
training images (the first sample of each of the first 256 distinct images, in data order):

    features_rel_l2   ‖f_on − f_off‖ / ‖f_off‖ over the sample's CLIP features (what the ST reads)
    cls_cosine        mean cosine of each image's [CLS] feature with and without the module
    loss_ie_on/off    loss_IE (against the `kt` queue) with the module and with it bypassed

The prompt network (eim.clip_tuning=network) is the identity at initialisation: drift 0 and equal
losses before training. Prompt tokens (tokens) already move the features before any training. The
measurement runs in float32 with gradients off and draws no random numbers, so training is unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from eimctl.data.features import ImageDataset
from eimctl.eim.losses import queue_infonce
from eimctl.runtime.progress import log

SAMPLE_IMAGES = 256


def trains_clip_tuning(model) -> bool:
    """Whether the stage trains the CLIP tuning module (ClipEncoder's `prompts*` parameters)."""
    return any(p.requires_grad for name, p in model.clip.named_parameters() if name.startswith("prompts"))


def sample_rows(split, limit: int = SAMPLE_IMAGES) -> list[int]:
    """Sample indices (= key-queue rows): the first sample of each of the first `limit` distinct images
    (text-only samples have none)."""
    rows: dict[str, int] = {}
    for index, sample in enumerate(split.samples):
        if len(rows) == limit:
            break
        if getattr(sample, "image", None) is not None:
            rows.setdefault(sample.image_id, index)
    return list(rows.values())


@contextmanager
def bypassed(clip):
    """CLIP with its tuning module switched off (as when no stage has trained it)."""
    active = clip.prompts_active
    clip.prompts_active = False
    try:
        yield clip
    finally:
        clip.prompts_active = active


def _loss_ie(model, features: torch.Tensor, queues: dict, rows: list[int], eim) -> float:
    return float(queue_infonce(model.ie_query(features), queues["kt"], torch.tensor(rows),
                               temperature=eim.temperature, chunk_rows=eim.chunk_rows or None))


@torch.no_grad()
def measure_drift(model, config, split, queues: dict, device: torch.device, batch_size: int = 32) -> dict:
    """{images, features_rel_l2, cls_cosine[, loss_ie_on, loss_ie_off]} on the fixed sample."""
    rows = sample_rows(split)
    images = ImageDataset(split.image_root, [split.samples[r].image for r in rows], model.clip.preprocess,
                          config.data.allow_outside_root)
    model.clip.to(device)
    was_training = model.training
    model.eval()
    sums = {"diff": 0.0, "ref": 0.0, "cos": 0.0, "on": 0.0, "off": 0.0}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pixels = torch.stack([images[start + k] for k in range(len(chunk))]).to(device)
        on = model.encode_images(pixels).float()
        with bypassed(model.clip):
            off = model.encode_images(pixels).float()
        sums["diff"] += float((on.double() - off.double()).pow(2).sum())
        sums["ref"] += float(off.double().pow(2).sum())
        sums["cos"] += float(F.cosine_similarity(on[:, 0].double(), off[:, 0].double(), dim=-1).sum())
        if "kt" in queues:
            sums["on"] += _loss_ie(model, on, queues, chunk, config.eim) * len(chunk)
            sums["off"] += _loss_ie(model, off, queues, chunk, config.eim) * len(chunk)
    model.train(was_training)
    result = {"images": len(rows), "features_rel_l2": (sums["diff"] / max(sums["ref"], 1e-30)) ** 0.5,
              "cls_cosine": sums["cos"] / max(len(rows), 1)}
    if "kt" in queues:
        result.update(loss_ie_on=sums["on"] / len(rows), loss_ie_off=sums["off"] / len(rows))
    return result


def check_clip_tuning(model, config, split, queues: dict, device: torch.device, when: str,
                      show: bool = True) -> dict | None:
    """Measure and print one line when the stage trains the CLIP tuning module; else None."""
    if not trains_clip_tuning(model):
        return None
    drift = measure_drift(model, config, split, queues, device)
    losses = (f", loss_IE {drift['loss_ie_on']:.4f} with it / {drift['loss_ie_off']:.4f} bypassed"
              if "loss_ie_on" in drift else "")
    log(f"CLIP tuning module {when} training: features moved {drift['features_rel_l2']:.4%} (relative L2), "
        f"[CLS] cosine {drift['cls_cosine']:.6f}{losses} ({drift['images']} images)", show)
    return drift
