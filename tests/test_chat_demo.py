"""The chat demo's data: instruction files eimctl's instruct reader takes (text-only and image samples mixed,
yes/no questions balanced), an MME-layout benchmark its MME reader takes (Yes question first, new scenes),
determinism and the skip of a finished set."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from eimctl.config import DataConfig
from eimctl.data.chat_demo import (CODES, MME_SUBTASKS, SUMMARY, TRAIN_FILES, YES_NO, generate_chat_demo, mme_item,
                                   sample_scene, scene_key)
from eimctl.runtime.errors import EimError
from eimctl.tasks.instruct_data import read_instruct
from eimctl.tasks.mme_data import read_mme

SMALL = {"n_train_images": 40, "n_mme_images": 6, "image_size": 32}


@pytest.fixture(scope="module")
def chat_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("chat") / "data"
    return out, generate_chat_demo(out, **SMALL)


def _train(out: Path):
    return read_instruct(DataConfig(task="instruct", path=str(out / "train"), image_root=str(out / "train/images")),
                         "train")


def _json_files(out: Path) -> dict[str, bytes]:
    files = [out / "train" / name for name in TRAIN_FILES.values()] + sorted((out / "mme").rglob("*.txt"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_train_files_parse_with_the_instruct_reader(chat_set):
    out, summary = chat_set
    split = _train(out)
    samples = summary["train"]["samples"]
    assert len(split.samples) == summary["train"]["total_samples"] == sum(samples.values())
    kinds = Counter(s.kind for s in split.samples)
    assert kinds["llava"] == samples["detail"] + samples["conversation_open"] + samples["conversation_yes_no"]
    assert kinds["alpaca"] == samples["alpaca_with_input"] + samples["alpaca_without_input"]
    assert samples["detail"] == SMALL["n_train_images"] and samples["alpaca_with_input"] > 0
    assert samples["alpaca_without_input"] > 0
    assert len(split.images()) == SMALL["n_train_images"]
    assert all((split.image_root / path).is_file() for _, path in split.images())
    assert all("<image>" not in s.instruction for s in split.samples)
    # every conversation pair is a sample: 2-3 per image
    per_image = Counter(s.image_id for s in split.samples if s.sample_id.startswith("gpt4_2_"))
    assert set(per_image.values()) <= {2, 3} and len(per_image) == SMALL["n_train_images"]


def test_text_only_and_image_samples_mix(chat_set):
    out, summary = chat_set
    split = _train(out)
    text_only = sum(not s.has_image for s in split.samples)
    assert 0 < text_only < len(split.samples)
    assert abs(text_only / len(split.samples) - 0.3) < 0.01
    assert summary["train"]["text_only_share"] == round(text_only / len(split.samples), 4)
    assert any(s.input for s in split.samples if not s.has_image)
    assert any(not s.input for s in split.samples if not s.has_image)


def test_yes_no_questions_are_balanced_and_mme_phrased(chat_set):
    out, summary = chat_set
    yes_no = [s for s in _train(out).samples if s.instruction.endswith(YES_NO)]
    answers = Counter(s.response for s in yes_no)
    assert set(answers) == {"Yes", "No"} and answers["Yes"] == answers["No"]
    assert summary["train"]["yes_no"]["Yes"] == answers["Yes"] == summary["train"]["yes_no"]["No"]
    assert summary["train"]["samples"]["conversation_yes_no"] == len(yes_no)
    for family, tally in summary["train"]["yes_no"]["by_family"].items():
        assert tally["Yes"] == tally["No"], family
    # every other sample's answer is a short text, not a bare yes/no
    assert all(s.response not in ("Yes", "No") for s in _train(out).samples if not s.instruction.endswith(YES_NO))


def test_mme_folder_follows_the_release_layout(chat_set):
    out, summary = chat_set
    split = read_mme(DataConfig(task="mme", path=str(out / "mme")))
    assert split.subtasks == list(MME_SUBTASKS)
    per_task = Counter(s.subtask for s in split.samples)
    assert dict(per_task) == summary["mme"]["questions"] == {t: 2 * SMALL["n_mme_images"] for t in MME_SUBTASKS}
    assert [s.gt for s in split.samples] == ["Yes", "No"] * (len(split.samples) // 2)
    assert all(s.question.endswith(YES_NO) for s in split.samples)
    for task in MME_SUBTASKS:
        texts = sorted((out / "mme" / task).glob("*.txt"))
        assert len(texts) == len(list((out / "mme" / task).glob("*.jpg"))) == SMALL["n_mme_images"]
        for path in texts:
            lines = path.read_text(encoding="utf-8").splitlines()
            assert len(lines) == 2 and lines[0].endswith("\tYes") and lines[1].endswith("\tNo"), path
            assert lines[0] != lines[1]


def test_mme_answer_templates_read_the_same_questions(chat_set):
    out, _ = chat_set
    official = read_mme(DataConfig(task="mme", path=str(out / "mme")))
    templates = read_mme(DataConfig(task="mme", path=str(out / "mme/answer_templates"), image_root=str(out / "mme")))
    assert [(s.sample_id, s.image, s.question, s.gt) for s in templates.samples] == \
        [(s.sample_id, s.image, s.question, s.gt) for s in official.samples]


def test_mme_images_are_new(chat_set):
    out, _ = chat_set
    train_names = {name for name, _ in _train(out).images()}
    train_bytes = {(out / "train/images" / name).read_bytes() for name in train_names}
    mme_images = sorted((out / "mme").rglob("*.jpg"))
    assert len(mme_images) == 4 * SMALL["n_mme_images"]
    assert not train_names & {p.name for p in mme_images}
    assert not train_bytes & {p.read_bytes() for p in mme_images}


def test_an_mme_scene_is_never_a_training_scene():
    """A scene equal to a training one (same objects in the same cells) is redrawn."""
    for task in MME_SUBTASKS:
        for index in range(5):
            objects, pair, _ = mme_item(task, index, 0, set())
            assert [a for _, a in pair] == ["Yes", "No"] and pair[0][0] != pair[1][0]
            redrawn, _, _ = mme_item(task, index, 0, {scene_key(objects)})
            assert scene_key(redrawn) != scene_key(objects)
    train = {scene_key(sample_scene(np.random.default_rng([0, CODES["train"], i]))) for i in range(2000)}
    assert any(scene_key(mme_item("count", i, 0, set())[0]) in train for i in range(200))  # collisions do occur
    assert all(scene_key(mme_item("count", i, 0, train)[0]) not in train for i in range(200))


def test_same_seed_same_bytes_other_seed_other_data(chat_set, tmp_path):
    out, summary = chat_set
    again = generate_chat_demo(tmp_path / "again", **SMALL)
    assert again == summary
    assert _json_files(tmp_path / "again") == _json_files(out)
    other = generate_chat_demo(tmp_path / "other", seed=1, **SMALL)
    assert other["parameters"]["seed"] == 1
    assert _json_files(tmp_path / "other") != _json_files(out)


def test_a_finished_set_is_kept_and_a_foreign_folder_refused(tmp_path):
    out = tmp_path / "data"
    first = generate_chat_demo(out, n_train_images=4, n_mme_images=2, image_size=32)
    stamp = (out / SUMMARY).stat().st_mtime_ns
    assert generate_chat_demo(out, n_train_images=4, n_mme_images=2, image_size=32) == first
    assert (out / SUMMARY).stat().st_mtime_ns == stamp
    changed = generate_chat_demo(out, n_train_images=5, n_mme_images=2, image_size=32)
    assert changed["train"]["images"] == 5 and json.loads((out / SUMMARY).read_text())["train"]["images"] == 5
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(EimError, match="not a folder made by eimctl"):
        generate_chat_demo(foreign, n_train_images=4, n_mme_images=2)
