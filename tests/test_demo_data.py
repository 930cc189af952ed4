"""The demo data generator: deterministic, correctly split, varied and descriptive captions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eimctl.data.demo import COLOURS, HELD_OUT, SHAPES, duplicate_caption_rate, generate_demo_data
from eimctl.runtime.errors import EimError

SMALL = {"n_world_images": 8, "n_train_images": 12, "n_val_images": 4, "n_test_images": 6}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_data(out, seed=3, **SMALL)
    return out


def test_same_seed_gives_identical_files(demo_dir, tmp_path):
    again = tmp_path / "again"
    generate_demo_data(again, seed=3, **SMALL)
    first = sorted(p.relative_to(demo_dir) for p in demo_dir.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    assert len([p for p in first if p.suffix == ".png"]) == 30
    for relative in first:
        assert (demo_dir / relative).read_bytes() == (again / relative).read_bytes(), relative


def test_other_seed_gives_other_data(demo_dir, tmp_path):
    other = tmp_path / "other"
    generate_demo_data(other, seed=4, **SMALL)
    assert (other / "test.jsonl").read_text() != (demo_dir / "test.jsonl").read_text()
    assert (other / "images/test-0.png").read_bytes() != (demo_dir / "images/test-0.png").read_bytes()


def test_split_counts_and_record_format(demo_dir):
    summary = json.loads((demo_dir / "demo.json").read_text())
    expected = {"world": (8, 2), "train": (12, 2), "val": (4, 5), "test": (6, 5)}
    for split, (n_images, per_image) in expected.items():
        records = _read_jsonl(demo_dir / f"{split}.jsonl")
        assert len(records) == n_images * per_image
        counts = summary["counts"][split]
        assert (counts["images"], counts["captions"]) == (n_images, n_images * per_image)
        assert 0 <= counts["duplicate_rate"] <= 1
        assert len({r["image"] for r in records}) == n_images
        for record in records:
            assert set(record) == {"sample_id", "image", "caption"}
            split_name, image_number, caption_number = record["sample_id"].split("-")
            assert split_name == split and record["image"] == f"images/{split}-{image_number}.png"
            assert 0 <= int(caption_number) < per_image
            assert record["caption"] == record["caption"].lower() and not record["caption"].endswith(".")
    with Image.open(demo_dir / "images/train-0.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"


def test_reference_captions_are_phrased_differently(demo_dir):
    records = _read_jsonl(demo_dir / "test.jsonl")
    by_image: dict[str, list[str]] = {}
    for record in records:
        by_image.setdefault(record["image"], []).append(record["caption"])
    for captions in by_image.values():
        assert len(captions) == 5
        # Phrasing = the caption's first three words; object order alone does not count.
        openings = {" ".join(caption.split()[:3]) for caption in captions}
        assert len(set(captions)) == 5 and len(openings) >= 3, captions


def test_captions_name_colour_and_shape_that_are_drawn(demo_dir):
    records = _read_jsonl(demo_dir / "val.jsonl") + _read_jsonl(demo_dir / "test.jsonl")
    for record in records:
        words = record["caption"].replace(",", " ").split()
        colours = [w for w in words if w in COLOURS]
        shapes = [w for w in words if w in SHAPES]
        assert colours and len(colours) == len(shapes) <= 3, record["caption"]
        assert words.count("small") + words.count("large") == len(shapes)
        # Every named colour is actually present in the image.
        with Image.open(demo_dir / record["image"]) as image:
            pixels = np.asarray(image, dtype=np.int32).reshape(-1, 3)
        for colour in colours:
            distance = np.abs(pixels - np.array(COLOURS[colour])).sum(axis=1)
            assert (distance < 45).sum() >= 4, (colour, record)


def test_existing_dataset_is_kept_and_changed_parameters_rebuild(demo_dir, tmp_path):
    out = tmp_path / "cached"
    generate_demo_data(out, seed=3, **SMALL)
    marker_time = (out / "demo.json").stat().st_mtime_ns
    generate_demo_data(out, seed=3, **SMALL)
    assert (out / "demo.json").stat().st_mtime_ns == marker_time
    counts = generate_demo_data(out, seed=3, **{**SMALL, "n_train_images": 5})
    assert (counts["train"]["images"], counts["train"]["captions"]) == (5, 10)
    assert not (out / "images/train-6.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(EimError, match="not a folder made by"):
        generate_demo_data(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


def _pairs(caption: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption names: "a small red circle" -> ("red", "circle")."""
    words = caption.replace(",", " ").replace(":", " ").split()
    return {(words[i], words[i + 1]) for i in range(len(words) - 1) if words[i] in COLOURS and words[i + 1] in SHAPES}


def test_training_never_shows_held_out_pairs_and_every_test_image_has_one(tmp_path):
    out = tmp_path / "data"
    generate_demo_data(out, seed=1, n_world_images=60, n_train_images=80, n_val_images=10, n_test_images=30)
    train = _read_jsonl(out / "train.jsonl")
    assert not any(_pairs(r["caption"]) & HELD_OUT for r in train)
    for split in ("val", "test"):
        by_image: dict[str, set] = {}
        for record in _read_jsonl(out / f"{split}.jsonl"):
            by_image.setdefault(record["image"], set()).update(_pairs(record["caption"]))
        assert all(pairs & HELD_OUT for pairs in by_image.values()), split
    world_pairs = set().union(*(_pairs(r["caption"]) for r in _read_jsonl(out / "world.jsonl")))
    assert world_pairs & HELD_OUT            # the pretraining corpus does show them


def test_duplicate_rate_by_hand():
    # caption "a" belongs to images 0 and 1: 2 of the 4 captions are another image's caption too
    assert duplicate_caption_rate([["a", "b"], ["a", "c"]]) == 0.5
    assert duplicate_caption_rate([["a", "a"], ["b"]]) == 0.0   # the same image twice is not a duplicate
