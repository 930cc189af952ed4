"""Demo pretraining: tiny CLIP and LM folders load back through open_clip and transformers."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from eimctl.data.demo import generate_demo_data
from eimctl.demo.pretrain import CLIP_MEAN, CLIP_STD, pretrain_demo_clip, pretrain_demo_lm
from eimctl.runtime.errors import EimError

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_LM = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "data"
    generate_demo_data(out, n_world_images=48, n_train_images=8, n_val_images=8, n_test_images=4)
    return out


def _clip(data_dir: Path, out_dir: Path, lines: list[str] | None = None) -> Path:
    return pretrain_demo_clip(data_dir, out_dir, epochs=2, batch_size=16, model_cfg=TINY_CLIP,
                              retrieval_images=8, log=(lines.append if lines is not None else lambda _: None),
                              log_every=2)


def _lm(data_dir: Path, out_dir: Path, lines: list[str] | None = None) -> Path:
    # A high learning rate so that a few steps visibly train the tiny model.
    return pretrain_demo_lm(data_dir, out_dir, epochs=5, batch_size=16, learning_rate=1e-2, model_cfg=TINY_LM,
                            log=(lines.append if lines is not None else lambda _: None), log_every=2)


def test_clip_loads_back_through_open_clip_local_dir(data_dir, tmp_path):
    lines: list[str] = []
    clip_dir = _clip(data_dir, tmp_path / "models", lines)
    assert clip_dir == tmp_path / "models" / "clip"
    assert any(line.startswith("clip step 2/6 loss") and "elapsed" in line for line in lines), lines
    assert any("val retrieval top-1" in line for line in lines), lines

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(clip_dir))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(clip_dir))
    assert isinstance(model, open_clip.CLIP)
    assert tokenizer.context_length == 32
    config = json.loads((clip_dir / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["size"] == 64
    normalize = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert list(normalize.mean) == config["preprocess_cfg"]["mean"] == list(CLIP_MEAN)
    assert list(normalize.std) == config["preprocess_cfg"]["std"] == list(CLIP_STD)

    # The saved weights are the trained ones, not a fresh initialisation.
    fresh = open_clip.CLIP(**TINY_CLIP)
    assert not torch.equal(fresh.visual.conv1.weight, model.visual.conv1.weight)

    with Image.open(data_dir / "images/val-0.png") as image:
        pixels = preprocess(image.convert("RGB")).unsqueeze(0)
    assert pixels.shape == (1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(["a small red circle on the left"]), normalize=True)
    assert image_features.shape == text_features.shape == (1, 32)

    metrics = json.loads((clip_dir / "pretrain.json").read_text())["metrics"]
    assert metrics["steps"] == 6 and metrics["retrieval_images"] == 8
    assert 0.0 <= metrics["image_to_text_top1"] <= 1.0
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


def test_clip_is_deterministic_and_skips_finished_work(data_dir, tmp_path):
    first = _clip(data_dir, tmp_path / "a")
    second = _clip(data_dir, tmp_path / "b")
    weights = "open_clip_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    lines: list[str] = []
    marker_time = (first / "pretrain.json").stat().st_mtime_ns
    assert _clip(data_dir, tmp_path / "a", lines) == first
    assert lines == [f"clip: already pretrained in {first}"]
    assert (first / "pretrain.json").stat().st_mtime_ns == marker_time


def test_lm_and_tokenizer_load_back_through_transformers(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines: list[str] = []
    lm_dir = _lm(data_dir, tmp_path / "models", lines)
    assert lm_dir == tmp_path / "models" / "lm"
    assert any(line.startswith("lm step") and "loss" in line for line in lines), lines
    assert any("val perplexity" in line for line in lines), lines

    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    assert model.config.n_layer == 1 and model.config.vocab_size == len(tokenizer)
    assert (lm_dir / "model.safetensors").is_file()
    end_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == end_id
    assert model.config.eos_token_id == end_id

    caption = json.loads((data_dir / "val.jsonl").read_text().splitlines()[0])["caption"]
    ids = tokenizer(caption)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == len(caption.replace(",", " ,").split())  # one token per word or comma
    assert tokenizer.decode(ids) == caption
    assert tokenizer.decode([end_id] + ids + [end_id], skip_special_tokens=True) == caption

    with torch.no_grad():
        logits = model(torch.tensor([[end_id] + ids])).logits
    assert logits.shape == (1, len(ids) + 1, len(tokenizer))

    metrics = json.loads((lm_dir / "pretrain.json").read_text())["metrics"]
    # Trained: far better than guessing uniformly over the vocabulary.
    assert 1.0 < metrics["val_perplexity"] < len(tokenizer) / 2


def test_lm_is_deterministic_and_skips_finished_work(data_dir, tmp_path):
    first = _lm(data_dir, tmp_path / "a")
    second = _lm(data_dir, tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    lines: list[str] = []
    assert _lm(data_dir, tmp_path / "a", lines) == first
    assert lines == [f"lm: already pretrained in {first}"]


def test_time_cap_stops_training_early(data_dir, tmp_path):
    lines: list[str] = []
    lm_dir = pretrain_demo_lm(data_dir, tmp_path / "models", epochs=50, batch_size=16, model_cfg=TINY_LM,
                              max_seconds=0.0, log=lines.append)
    metrics = json.loads((lm_dir / "pretrain.json").read_text())["metrics"]
    assert metrics["stopped_early"] and metrics["steps"] <= 1
    assert any("time cap" in line for line in lines), lines


def test_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(EimError, match="no demo dataset"):
        pretrain_demo_lm(tmp_path / "nothing", tmp_path / "models", log=lambda _: None)
