"""Image loading for training and the frozen-CLIP feature cache.

When CLIP is frozen, each image is encoded once (not once per caption) and the
features are kept in a memory-mapped .npy file under `<run>/cache/`, keyed by a
fingerprint of the CLIP config and the split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eimctl.runtime.atomic import atomic_path
from eimctl.config import DataConfig, fingerprint, to_dict
from eimctl.data.captions import CaptionSplit
from eimctl.data.images import load_image
from eimctl.runtime.progress import StepProgress


class ImageDataset(Dataset):
    def __init__(self, root: Path, paths: list[str], preprocess, allow_outside_root: bool = False):
        self.root, self.paths, self.preprocess = root, paths, preprocess
        self.allow_outside_root = allow_outside_root

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_image(self.root, self.paths[index], self.allow_outside_root))


def check_images(split: CaptionSplit, data: DataConfig) -> None:
    """Open every image once up front, so a bad file fails before any training."""
    for _, path in split.images():
        load_image(split.image_root, path, data.allow_outside_root)


@torch.no_grad()
def encode_split_images(clip, split: CaptionSplit, data: DataConfig, device: torch.device,
                        batch_size: int = 64, num_workers: int = 0, show: bool = True) -> np.ndarray:
    images = split.images()
    dataset = ImageDataset(split.image_root, [p for _, p in images], clip.preprocess, data.allow_outside_root)
    # its own generator: iterating must not move the global RNG, or a run that finds the cache
    # already built would draw other dropout masks than one that builds it
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    out = np.zeros((len(images), clip.num_tokens, clip.feature_dim), dtype=np.float32)
    progress = StepProgress(f"encode {split.name} images", len(loader), log_every=max(1, len(loader) // 10),
                            enabled=show)
    row = 0
    for number, pixels in enumerate(loader, start=1):
        features = clip.encode_images(pixels.to(device)).float().cpu().numpy()
        out[row:row + len(features)] = features
        row += len(features)
        progress.update(number)
    progress.close()
    return out


def _tuning_key(clip) -> str:
    """The active CLIP tuning module's values: prompt tokens as before, the prompt network by a hash of its
    bytes (its millions of values would make a slow JSON text)."""
    if not clip.prompts_active:
        return ""
    if getattr(clip, "prompts_network", None) is not None:
        return clip.prompts_network.digest()
    return fingerprint(clip.prompts.tolist())


def cached_features(clip, clip_config, split: CaptionSplit, data: DataConfig, cache_dir: Path,
                    device: torch.device, num_workers: int = 0, show: bool = True):
    """(features [n_images, T, d] memory-mapped, image_id -> row) for a frozen CLIP.

    An active CLIP tuning module changes the features, so its parameter values are part of the key."""
    prompts = _tuning_key(clip)
    key = fingerprint({"clip": to_dict(clip_config), "split": split.fingerprint,
                       "root": str(Path(split.image_root).resolve()), "extra": prompts})
    path = Path(cache_dir) / f"features-{split.name}-{key}.npy"
    if not path.is_file():
        features = encode_split_images(clip, split, data, device, num_workers=num_workers, show=show)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, features, allow_pickle=False)
    features = np.load(path, mmap_mode="r", allow_pickle=False)
    rows = {image_id: row for row, (image_id, _) in enumerate(split.images())}
    return features, rows
