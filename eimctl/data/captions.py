"""Captioning samples and the readers that produce them.

A split is a list of samples, one per (image, caption) pair, in data-set order;
the sample's position is its queue index. Evaluation groups samples by image.

    read_split(config.data, "train")   # COCO Karpathy or JSONL, by config.data.format
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from eimctl.config import DataConfig
from eimctl.runtime.errors import EimError


@dataclass(frozen=True)
class CaptionSample:
    sample_id: str
    image_id: str
    image: str          # path relative to the split's image root (or absolute)
    caption: str
    instruction: str = ""


@dataclass
class Split:
    """One split of any task's data: its samples (each with `image`/`image_id`, None for text-only), where
    their images are, and a fingerprint of the files read."""
    name: str
    image_root: Path
    samples: list
    fingerprint: str

    def images(self) -> list[tuple[str, str]]:
        """Unique (image_id, image path) pairs of the samples that have an image, in first-seen order."""
        return unique_images(self.samples)


@dataclass
class CaptionSplit(Split):
    samples: list[CaptionSample]

    def references(self) -> dict[str, list[str]]:
        refs: dict[str, list[str]] = {}
        for sample in self.samples:
            refs.setdefault(sample.image_id, []).append(sample.caption)
        return refs


def unique_images(samples) -> list[tuple[str, str]]:
    """Unique (image_id, image path) pairs of the samples that have an image (`image` not None), in
    first-seen order: what a split's images() gives the feature cache (every task's splits share it)."""
    seen: dict[str, str] = {}
    for sample in samples:
        if sample.image is not None:
            seen.setdefault(sample.image_id, sample.image)
    return list(seen.items())


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _check_unique(samples: list[CaptionSample], where: str) -> None:
    seen: dict[str, int] = {}
    for row, sample in enumerate(samples, start=1):
        if sample.sample_id in seen:
            raise EimError(f"duplicate sample_id '{sample.sample_id}' (rows {seen[sample.sample_id]} and {row})",
                           where=where, hint="give every sample a unique sample_id")
        seen[sample.sample_id] = row


def _check_caption(caption, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise EimError("empty caption", where=where, hint="remove the row or give it a caption")
    return caption.strip()


def read_jsonl_split(folder: Path, split: str, image_root: Path) -> CaptionSplit:
    """`folder/<split>.jsonl`, one `{"image", "caption"}` (or instruction/response) object per line."""
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise EimError(f"split file not found: {path}",
                       hint=f"data.path must be a folder holding {split}.jsonl")
    samples = []
    with open(path, encoding="utf-8") as handle:
        for row, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, row {row}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EimError(f"malformed JSON: {error.msg}", where=where, hint="fix or remove that line") from None
            if not isinstance(record, dict):
                raise EimError("row is not a JSON object", where=where, hint='write {"image": ..., "caption": ...}')
            caption = record.get("caption", record.get("response"))
            if "image" not in record or caption is None:
                raise EimError("row needs 'image' and 'caption' (or 'response')", where=where,
                               hint='write {"image": "path.jpg", "caption": "..."}')
            image = record["image"]
            sample_id = str(record.get("sample_id", f"{split}-{row}"))
            samples.append(CaptionSample(sample_id=sample_id, image_id=str(record.get("image_id", image)),
                                         image=str(image), caption=_check_caption(caption, where),
                                         instruction=str(record.get("instruction", ""))))
    if not samples:
        raise EimError("split has no samples", where=str(path), hint="add rows to the file")
    _check_unique(samples, str(path))
    return CaptionSplit(split, image_root, samples, _file_digest(path))


KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_karpathy_split(path: Path, split: str, image_root: Path) -> CaptionSplit:
    """COCO Karpathy `dataset_coco.json`: train = train + restval; val; test (5,000 images)."""
    if not path.is_file():
        raise EimError(f"Karpathy split file not found: {path}", hint="point data.path at dataset_coco.json")
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
        images = dataset["images"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EimError("not a Karpathy dataset_coco.json (no 'images' list)", where=str(path),
                       hint="use the dataset_coco.json from Karpathy's split archive") from None
    samples = []
    for number, image in enumerate(images):
        if image.get("split") not in KARPATHY_SPLITS[split]:
            continue
        image_path = f"{image.get('filepath', '')}/{image['filename']}".lstrip("/")
        image_id = str(image.get("cocoid", image.get("imgid", number)))
        for sentence in image.get("sentences", []):
            where = f"{path}, image {image_id}"
            samples.append(CaptionSample(sample_id=str(sentence.get("sentid", f"{image_id}-{len(samples)}")),
                                         image_id=image_id, image=image_path,
                                         caption=_check_caption(sentence.get("raw"), where)))
    if not samples:
        raise EimError(f"no samples for split '{split}'", where=str(path), hint="check the file's 'split' fields")
    _check_unique(samples, str(path))
    return CaptionSplit(split, image_root, samples, _file_digest(path) + f":{split}")


def read_split(data: DataConfig, split: str) -> CaptionSplit:
    if not data.path:
        raise EimError("no data set given", hint="set data.path (a JSONL folder or dataset_coco.json)")
    path = Path(data.path)
    if data.format == "coco-karpathy":
        root = Path(data.image_root) if data.image_root else path.parent
        return read_karpathy_split(path, split, root)
    root = Path(data.image_root) if data.image_root else path
    return read_jsonl_split(path, split, root)
