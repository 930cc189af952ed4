"""The shared workspace of the benchmarks that train or build queues: demo data and tiny random models.

    prepare_workspace(work, scale)           # once, in the parent process
    config = bench_config(work, "cpu", ...)  # in each child: an eimctl config over that workspace
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from common import BATCH


def _random_clip(clip_dir: Path) -> None:
    """A random demo-sized open_clip model saved as a `local-dir:` model."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from eimctl.demo.pretrain import CLIP_MEAN, CLIP_STD, DEFAULT_CLIP_MODEL_CFG

    clip_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(DEFAULT_CLIP_MODEL_CFG)
    image_size = cfg["vision_cfg"]["image_size"]
    preprocess_cfg = {"size": image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}))
    torch.manual_seed(0)
    clip = open_clip.CLIP(**copy.deepcopy(cfg))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, clip_dir / "open_clip_model.safetensors")


def _random_lm(lm_dir: Path, data: Path) -> None:
    """A random demo-sized GPT-2 with the demo's word tokenizer over the training captions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from eimctl.demo.pretrain import DEFAULT_LM_CFG, END_OF_TEXT, build_word_tokenizer

    captions = [json.loads(line)["caption"] for line in (data / "train.jsonl").read_text().splitlines() if line]
    tokenizer = build_word_tokenizer(captions, DEFAULT_LM_CFG["n_positions"])
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=end_id, eos_token_id=end_id,
                                    pad_token_id=end_id, **DEFAULT_LM_CFG))
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)


def prepare_workspace(work: Path, scale: dict) -> dict:
    """Demo data (train split of `images` images x 2 captions), a random demo-sized CLIP and GPT-2."""
    from eimctl.data.demo import generate_demo_data

    data = work / "data"
    generate_demo_data(data, n_world_images=8, n_train_images=scale["images"], n_val_images=8, n_test_images=8)
    clip_dir, lm_dir = work / "clip", work / "lm"
    _random_clip(clip_dir)
    _random_lm(lm_dir, data)
    return {"data": str(data), "clip": f"local-dir:{clip_dir}", "lm": str(lm_dir)}


def bench_config(work: Path, device: str, *extra: str):
    """The config every workspace benchmark trains with: ClipCap, MLP prefix of 10, batch BATCH."""
    from eimctl.config import load_config
    return load_config(overrides=[
        "data.format=jsonl", f"data.path={work / 'data'}", f"model.clip.name=local-dir:{work / 'clip'}",
        "model.clip.pretrained=", "model.clip.tokens=pooled", "model.projector.type=mlp",
        "model.projector.prefix_length=10", f"model.lm.name={work / 'lm'}", f"train.batch_size={BATCH}",
        "train.lr=2e-4", "train.warmup_steps=10", f"train.device={device}", *extra])
