"""COCO Karpathy and JSONL readers; image path confinement."""
import json
from pathlib import Path

import pytest

from eimctl.config import DataConfig
from eimctl.data.captions import read_split
from eimctl.data.images import load_image, resolve_image
from eimctl.runtime.errors import EimError


def karpathy(tmp_path: Path) -> Path:
    images = []
    for n, split in enumerate(["train", "restval", "val", "test", "test"]):
        images.append({"filepath": "val2014" if split != "train" else "train2014", "filename": f"{n}.jpg",
                       "cocoid": 100 + n, "split": split,
                       "sentences": [{"sentid": 10 * n + k, "raw": f"caption {n} {k}"} for k in range(2)]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_splits(tmp_path: Path):
    data = DataConfig(format="coco-karpathy", path=str(karpathy(tmp_path)))
    train, val, test = (read_split(data, s) for s in ("train", "val", "test"))
    assert [s.image_id for s in train.samples] == ["100", "100", "101", "101"]  # train + restval
    assert len(val.samples) == 2 and len(test.samples) == 4
    assert test.images() == [("103", "val2014/3.jpg"), ("104", "val2014/4.jpg")]
    assert test.references()["103"] == ["caption 3 0", "caption 3 1"]
    assert train.image_root == tmp_path
    assert train.fingerprint != test.fingerprint


def test_jsonl_groups_references_and_keeps_order(tmp_path: Path):
    rows = [{"image": "a.png", "caption": "one"}, {"image": "b.png", "caption": "two"},
            {"image": "a.png", "caption": "three"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    split = read_split(DataConfig(path=str(tmp_path)), "test")
    assert [s.sample_id for s in split.samples] == ["test-1", "test-2", "test-3"]
    assert split.references() == {"a.png": ["one", "three"], "b.png": ["two"]}


def test_jsonl_instruction_response_form(tmp_path: Path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": None, "instruction": "q?", "response": "r"}) + "\n")
    sample = read_split(DataConfig(path=str(tmp_path)), "train").samples[0]
    assert (sample.instruction, sample.caption) == ("q?", "r")


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "caption": ""}', "empty caption"),
    ('{"image": "a.png"', "malformed JSON"),
    ('{"caption": "x"}', "needs 'image'"),
])
def test_bad_jsonl_rows(tmp_path: Path, line, message):
    (tmp_path / "train.jsonl").write_text('{"image": "ok.png", "caption": "fine"}\n' + line + "\n")
    with pytest.raises(EimError, match=message) as caught:
        read_split(DataConfig(path=str(tmp_path)), "train")
    assert "row 2" in caught.value.line()


def test_duplicate_sample_ids(tmp_path: Path):
    rows = [{"sample_id": "x", "image": "a.png", "caption": "c"}] * 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(EimError, match="duplicate sample_id 'x'"):
        read_split(DataConfig(path=str(tmp_path)), "train")


def test_image_paths_confined_to_root(tmp_path: Path):
    with pytest.raises(EimError, match="escapes the data root"):
        resolve_image(tmp_path / "root", "../secret.png")
    assert resolve_image(tmp_path / "root", "../x.png", allow_outside_root=True) == (tmp_path / "x.png").resolve()


def test_missing_and_corrupt_images(tmp_path: Path):
    with pytest.raises(EimError, match="image not found"):
        load_image(tmp_path, "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(EimError, match="corrupt image"):
        load_image(tmp_path, "bad.png")
