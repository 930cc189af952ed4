"""The demo's own small CLIP: contrastive pretraining on the demo captions, and retrieval accuracy.

    clip_dir = pretrain_demo_clip(Path("runs/demo/data"), Path("runs/demo/models"))
    open_clip.create_model_and_transforms("local-dir:" + str(clip_dir))
    open_clip.get_tokenizer("local-dir:" + str(clip_dir))
"""
from __future__ import annotations

import math
import time
from copy import deepcopy
from functools import partial
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from eimctl.demo.common import Log, StepTrainer, data_parameters, pretrain_once, write_marker
from eimctl.runtime.atomic import write_json
from eimctl.runtime.jsonl import read_jsonl

# Sized so that data, both pretrainings and the captioner fit the demo's
# 15-minute budget on a 2-core CPU, while retrieval stays far above chance
# (the same 276 steps as 12 epochs over the first demo's 3,000 images took ~140 s).
DEFAULT_CLIP_MODEL_CFG = {
    "embed_dim": 128,
    # 16-px patches: 17 visual tokens ([CLS] + 4x4), cheap for the captioner
    # downstream, and on this data better than 8-px patches for the same time.
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 192, "layers": 4, "head_width": 48},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
# open_clip's own defaults (OpenAI CLIP mean/std), written out so the saved
# preprocess does exactly what training did.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pretrain_demo_clip(data_dir: Path, out_dir: Path, *, seed: int = 0, epochs: int = 6, batch_size: int = 128,
                       learning_rate: float = 1e-3, weight_decay: float = 0.1, model_cfg: dict | None = None,
                       retrieval_images: int = 100, max_seconds: float | None = None, log: Log = print,
                       log_every: int = 10) -> Path:
    """Contrastively pretrain a tiny open_clip CLIP; return `out_dir / "clip"` (a `local-dir:` folder)."""
    data_dir, target = Path(data_dir), Path(out_dir) / "clip"
    model_cfg = deepcopy(model_cfg or DEFAULT_CLIP_MODEL_CFG)
    parameters = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                  "weight_decay": weight_decay, "model_cfg": model_cfg, "retrieval_images": retrieval_images,
                  "max_seconds": max_seconds, "data": data_parameters(data_dir)}
    build = partial(_build_clip, data_dir=data_dir, parameters=parameters, log=log, log_every=log_every)
    return pretrain_once("clip", target, parameters, build, log)


def _build_clip(staging: Path, *, data_dir: Path, parameters: dict, log: Log, log_every: int) -> None:
    started = time.monotonic()
    torch.manual_seed(parameters["seed"])
    model = open_clip.CLIP(**deepcopy(parameters["model_cfg"]))
    images, tokens_of, n_captions = _training_data(data_dir, parameters["model_cfg"])
    log(f"clip: {len(images)} images, {n_captions} captions, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    trainer = _train(model, images, tokens_of, parameters, staging, log, log_every)

    _save(model, parameters["model_cfg"], staging)
    train_seconds = time.monotonic() - started
    accuracy = clip_retrieval_accuracy(staging, data_dir, "val", parameters["retrieval_images"])
    log(f"clip: val retrieval top-1 image->caption {accuracy['image_to_text_top1']:.3f}, "
        f"caption->image {accuracy['text_to_image_top1']:.3f} "
        f"(chance {accuracy['chance_top1']:.3f}, {accuracy['retrieval_images']} images), "
        f"trained {trainer.step} steps in {train_seconds:.0f}s")
    write_marker(staging, parameters, {**accuracy, **trainer.summary(train_seconds)})


def _preprocess_cfg(model_cfg: dict) -> dict:
    return {"size": model_cfg["vision_cfg"]["image_size"], "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def _load_images(data_dir: Path, image_paths: list[str], preprocess) -> torch.Tensor:
    return torch.stack([preprocess(Image.open(Path(data_dir) / p).convert("RGB")) for p in image_paths])


def _training_data(data_dir: Path, model_cfg: dict) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """The train images (preprocessed), each image's caption tokens, and the caption count."""
    # The same eval transform the saved folder will hand back, so training
    # inputs match what users of the model feed it.
    preprocess = open_clip.image_transform(model_cfg["vision_cfg"]["image_size"], is_train=False, mean=CLIP_MEAN,
                                           std=CLIP_STD, resize_mode="shortest", interpolation="bicubic")
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    records, _ = read_jsonl(data_dir / "world.jsonl")
    image_paths = list(dict.fromkeys(r["image"] for r in records))
    image_index = {path: i for i, path in enumerate(image_paths)}
    images = _load_images(data_dir, image_paths, preprocess)
    captions_of = [[] for _ in image_paths]
    for record in records:
        captions_of[image_index[record["image"]]].append(record["caption"])
    return images, [tokenizer(captions) for captions in captions_of], len(records)


def _train(model: open_clip.CLIP, images: torch.Tensor, tokens_of: list[torch.Tensor], parameters: dict,
           staging: Path, log: Log, log_every: int) -> StepTrainer:
    batch_size = parameters["batch_size"]
    steps_per_epoch = max(1, len(images) // batch_size)
    trainer = StepTrainer("clip", model, steps_per_epoch, parameters, staging / "metrics.jsonl", log, log_every)

    def epoch_batches(order_generator: torch.Generator):
        order = torch.randperm(len(images), generator=order_generator)
        # One caption per image per batch: two captions of one image in a
        # batch would be false negatives for each other.
        picks = [int(torch.randint(len(tokens_of[i]), (1,), generator=order_generator)) for i in order]
        for batch_start in range(0, steps_per_epoch * batch_size, batch_size):
            batch = order[batch_start:batch_start + batch_size]
            yield batch, torch.stack([tokens_of[int(i)][picks[batch_start + j]] for j, i in enumerate(batch)])

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        indices, texts = batch
        trainer.apply(_contrastive_loss(model, images[indices], texts))
        with torch.no_grad():  # CLIP's cap on the temperature, for stability
            model.logit_scale.clamp_(0, math.log(100))

    trainer.run(epoch_batches, step)
    return trainer


def _contrastive_loss(model: open_clip.CLIP, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(texts, normalize=True)
    logits = model.logit_scale.exp() * image_features @ text_features.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _save(model: open_clip.CLIP, model_cfg: dict, staging: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(staging / "open_clip_model.safetensors"))
    write_json(staging / "open_clip_config.json",
               {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(model_cfg)})


@torch.no_grad()
def clip_retrieval_accuracy(clip_dir: Path, data_dir: Path, split: str = "val", n_images: int = 100) -> dict:
    """Top-1 retrieval among the first `n_images` of `split`, loaded through open_clip's `local-dir:`."""
    model_name = "local-dir:" + str(clip_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    records, _ = read_jsonl(Path(data_dir) / f"{split}.jsonl")
    image_paths = list(dict.fromkeys(r["image"] for r in records))[:n_images]
    owner = {path: i for i, path in enumerate(image_paths)}
    kept = [r for r in records if r["image"] in owner]
    caption_owner = torch.tensor([owner[r["image"]] for r in kept])
    image_features = model.encode_image(_load_images(data_dir, image_paths, preprocess), normalize=True)
    text_features = model.encode_text(tokenizer([r["caption"] for r in kept]), normalize=True)
    similarity = image_features @ text_features.T
    image_to_text = (caption_owner[similarity.argmax(dim=1)] == torch.arange(len(image_paths))).float().mean()
    text_to_image = (similarity.argmax(dim=0) == caption_owner).float().mean()
    return {"image_to_text_top1": round(image_to_text.item(), 4), "text_to_image_top1": round(text_to_image.item(), 4),
            # Every image has the same number of captions, so both directions
            # have a chance level of one in n_images.
            "chance_top1": round(1 / len(image_paths), 4), "retrieval_images": len(image_paths)}
