"""Batches for a training stage: sample indices -> token tensors, masks and image inputs.

When CLIP is frozen in a stage, each image is encoded once (`train.feature_cache`)
and batches carry its cached features; otherwise they carry preprocessed pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from eimctl.data.features import ImageDataset, cached_features, check_images
from eimctl.data.tokens import TokenizedText, pad_batch


def image_inputs(model, config, train, cache_dir: Path, device: torch.device, show: bool) -> Callable:
    """`images_for(indices) -> {"features": ...}` (frozen CLIP, cached) or `{"pixels": ...}`."""
    clip_trains = any(p.requires_grad for p in model.clip.parameters())
    if config.train.feature_cache and not clip_trains:
        features, image_row = cached_features(model.clip.to(device), config.model.clip, train, config.data,
                                              cache_dir, device, config.train.num_workers, show)
        sample_rows = [image_row[s.image_id] for s in train.samples]

        def cached(indices: list[int]) -> dict:
            return {"features": torch.from_numpy(features[[sample_rows[i] for i in indices]].copy())}
        return cached
    check_images(train, config.data)
    pixels = ImageDataset(train.image_root, [s.image for s in train.samples], model.clip.preprocess,
                          config.data.allow_outside_root)

    def encoded_on_the_fly(indices: list[int]) -> dict:
        return {"pixels": torch.stack([pixels[i] for i in indices])}
    return encoded_on_the_fly


def make_collate(tokens: list[TokenizedText], pad_id: int, images_for: Callable) -> Callable:
    def collate(indices: list[int]) -> dict:
        return {"indices": torch.tensor(indices), **pad_batch([tokens[i] for i in indices], pad_id),
                **images_for(indices)}
    return collate
