"""Batches for a training stage: sample indices -> token tensors, masks and image inputs.

When CLIP is frozen in a stage, each image is encoded once (`train.feature_cache`)
and batches carry its cached features; otherwise they carry preprocessed pixels.
A text-only sample (`image` None, e.g. a ScienceQA problem without a picture) gets
zero features or zero pixels and `has_image` False; the family decides what that means.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from eimctl.data.features import ImageDataset, cached_features, check_images
from eimctl.data.tokens import TokenizedText, pad_batch


def has_image(sample) -> bool:
    return getattr(sample, "image", None) is not None


def image_inputs(model, config, train, cache_dir: Path, device: torch.device, show: bool) -> Callable:
    """`images_for(indices) -> {"features": ..., "has_image": ...}` (frozen CLIP, cached) or `{"pixels": ...}`."""
    clip_trains = any(p.requires_grad for p in model.clip.parameters())
    flags = torch.tensor([has_image(s) for s in train.samples], dtype=torch.bool)
    if config.train.feature_cache and not clip_trains:
        features, image_row = cached_features(model.clip.to(device), config.model.clip, train, config.data,
                                              cache_dir, device, config.train.num_workers, show)
        sample_rows = [image_row[s.image_id] if has_image(s) else -1 for s in train.samples]
        blank = np.zeros(features.shape[1:], dtype=features.dtype)

        def cached(indices: list[int]) -> dict:
            rows = [features[sample_rows[i]] if sample_rows[i] >= 0 else blank for i in indices]
            return {"features": torch.from_numpy(np.stack(rows)), "has_image": flags[indices]}
        return cached
    check_images(train, config.data)
    paths = [s.image for s in train.samples]
    pixels = ImageDataset(train.image_root, [p for p in paths if p is not None], model.clip.preprocess,
                          config.data.allow_outside_root)
    position = {i: n for n, i in enumerate(i for i, p in enumerate(paths) if p is not None)}

    def encoded_on_the_fly(indices: list[int]) -> dict:
        images = [pixels[position[i]] if i in position else None for i in indices]
        shape = next((image.shape for image in images if image is not None), None)
        if shape is None:
            shape = blank_pixels_shape(model.clip)
        return {"pixels": torch.stack([image if image is not None else torch.zeros(shape) for image in images]),
                "has_image": flags[indices]}
    return encoded_on_the_fly


def blank_pixels_shape(clip) -> tuple[int, int, int]:
    """(3, H, W) of the CLIP's input images (the zero image of a text-only sample)."""
    size = clip.model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return (3, *size)


def make_collate(tokens: list[TokenizedText], pad_id: int, images_for: Callable) -> Callable:
    def collate(indices: list[int]) -> dict:
        return {"indices": torch.tensor(indices), **pad_batch([tokens[i] for i in indices], pad_id),
                **images_for(indices)}
    return collate
