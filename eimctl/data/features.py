"""Image loading for training and the frozen-CLIP feature cache.

When CLIP is frozen, each image is encoded once (not once per caption) and the
features are kept in a memory-mapped .npy file under `<run>/cache/`, keyed by a
fingerprint of the CLIP config and the split. The images are encoded in parts
(`features-<split>-<key>.parts/NNNNN.npy`, each written atomically), so an interrupted
build keeps its finished parts; the .npy is assembled from them once all exist.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from eimctl.runtime.atomic import write_npy
from eimctl.config import DataConfig, fingerprint, to_dict
from eimctl.data.captions import CaptionSplit
from eimctl.data.images import load_image
from eimctl.runtime import faults
from eimctl.runtime.errors import EimError
from eimctl.runtime.interrupts import PartsInterrupted, StopSignals
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


PART_IMAGES = 1_024  # the cache is built in parts of this many images (a multiple of the batch size)
BATCH = 64


@torch.no_grad()
def _encode_part(clip, dataset: Dataset, device: torch.device, num_workers: int, progress, batches_done: int):
    """Features of every image in `dataset`, batch by batch; returns (features, batches_done)."""
    # its own generator: iterating must not move the global RNG, or a run that finds the cache
    # already built would draw other dropout masks than one that builds it
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    out = np.zeros((len(dataset), clip.num_tokens, clip.feature_dim), dtype=np.float32)
    row = 0
    for pixels in loader:
        features = clip.encode_images(pixels.to(device)).float().cpu().numpy()
        out[row:row + len(features)] = features
        row += len(features)
        batches_done += 1
        progress.update(batches_done)
    return out, batches_done


def encode_split_parts(clip, split: CaptionSplit, data: DataConfig, device: torch.device, parts_dir: Path,
                       num_workers: int = 0, show: bool = True) -> list[Path]:
    """Encode the split's images into `parts_dir/NNNNN.npy`, one atomically written file per part. Parts
    finished before an interruption are kept; a SIGINT/SIGTERM finishes the current part, then raises
    PartsInterrupted."""
    images = split.images()
    dataset = ImageDataset(split.image_root, [p for _, p in images], clip.preprocess, data.allow_outside_root)
    size = faults.feature_part_images(PART_IMAGES)
    spans = [(start, min(len(images), start + size)) for start in range(0, len(images), size)]
    paths = [parts_dir / f"{number:05d}.npy" for number in range(len(spans))]
    batches = [-(-(stop - start) // BATCH) for start, stop in spans]
    done = sum(count for count, path in zip(batches, paths) if path.is_file())
    progress = StepProgress(f"encode {split.name} images", sum(batches), start=done,
                            log_every=max(1, sum(batches) // 10), enabled=show)
    parts_dir.mkdir(parents=True, exist_ok=True)
    with StopSignals() as stop:
        for number, (start, stop_row) in enumerate(spans):
            if paths[number].is_file():
                continue
            features, done = _encode_part(clip, Subset(dataset, range(start, stop_row)), device, num_workers,
                                          progress, done)
            write_npy(paths[number], features)
            faults.pace()
            if stop.signal:
                progress.close()
                finished = sum(path.is_file() for path in paths)
                raise PartsInterrupted(stop.signal, f"encoding {split.name} images", finished, len(paths))
    progress.close()
    return paths


def _assemble(parts: list[Path], rows: int, path: Path) -> None:
    """Write the parts as one .npy (atomically), then remove them."""
    features = np.concatenate([np.load(part, allow_pickle=False) for part in parts])
    if len(features) != rows:  # parts from another part size: start again
        shutil.rmtree(parts[0].parent, ignore_errors=True)
        raise EimError(f"feature cache parts hold {len(features)} images, not {rows}", where=str(parts[0].parent),
                       hint="they were removed; rerun the same command to encode the images again")
    write_npy(path, features)
    shutil.rmtree(parts[0].parent, ignore_errors=True)


def _tuning_key(clip) -> str:
    """The active CLIP tuning module's values: prompt tokens as before, the prompt network by a hash of its
    bytes (its millions of values would make a slow JSON text); CLIP's own adapters (LaVIN's, attached with
    `attach_block_adapters`) by a hash of their bytes whenever they exist, trained or not."""
    adapters, key = getattr(clip, "adapters", None), ""
    if adapters is not None:
        hashed = hashlib.sha256()
        for name, tensor in adapters.state_dict().items():
            hashed.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            hashed.update(tensor.detach().float().cpu().numpy().tobytes())
        key = f"adapters-{hashed.hexdigest()[:16]}"
    if not clip.prompts_active:
        return key
    if getattr(clip, "prompts_network", None) is not None:
        return key + clip.prompts_network.digest()
    return key + fingerprint(clip.prompts.tolist())


def cached_features(clip, clip_config, split: CaptionSplit, data: DataConfig, cache_dir: Path,
                    device: torch.device, num_workers: int = 0, show: bool = True):
    """(features [n_images, T, d] memory-mapped, image_id -> row) for a frozen CLIP.

    An active CLIP tuning module changes the features, so its parameter values are part of the key."""
    prompts = _tuning_key(clip)
    key = fingerprint({"clip": to_dict(clip_config), "split": split.fingerprint,
                       "root": str(Path(split.image_root).resolve()), "extra": prompts})
    path = Path(cache_dir) / f"features-{split.name}-{key}.npy"
    if not path.is_file():
        parts_dir = path.with_suffix(".parts")
        parts = encode_split_parts(clip, split, data, device, parts_dir, num_workers=num_workers, show=show)
        _assemble(parts, len(split.images()), path)
    features = np.load(path, mmap_mode="r", allow_pickle=False)
    rows = {image_id: row for row, (image_id, _) in enumerate(split.images())}
    return features, rows
