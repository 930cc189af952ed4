"""Pretrain the demo's own small CLIP and language model on the generated data.

Real CLIP and GPT-2 weights cannot be downloaded here, so the embedded demo
makes stand-ins that have what the method relies on: a CLIP whose image and
text towers are aligned (contrastive pretraining on the demo captions) and an
LM that already knows the caption language (causal-LM pretraining).

    from eimctl.demo.pretrain import pretrain_demo_clip, pretrain_demo_lm
    clip_dir = pretrain_demo_clip(Path("runs/demo/data"), Path("runs/demo/models"))
    lm_dir = pretrain_demo_lm(Path("runs/demo/data"), Path("runs/demo/models"))

They load back through the ecosystem's own loaders:

    open_clip.create_model_and_transforms("local-dir:" + str(clip_dir))
    open_clip.get_tokenizer("local-dir:" + str(clip_dir))
    AutoModelForCausalLM.from_pretrained(lm_dir); AutoTokenizer.from_pretrained(lm_dir)

Each folder is built in a temporary sibling and renamed into place; its
`pretrain.json` (parameters and metrics, written last) lets a rerun with the
same parameters skip the work.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from copy import deepcopy
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from eimctl.atomic import write_json
from eimctl.data.demo import ensure_replaceable, publish_dir
from eimctl.errors import EimError

# Sized so that data, both pretrainings and the captioner fit the demo's
# 15-minute budget on a 2-core CPU, while retrieval stays far above chance
# (measured at the defaults: ~140 s for 12 epochs, val top-1 0.91, chance 0.01).
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
DEFAULT_LM_CFG = {"n_embd": 192, "n_layer": 3, "n_head": 4, "n_positions": 128}
END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<unk>"

Log = Callable[[str], None]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _data_parameters(data_dir: Path) -> dict:
    # The generator's parameters identify the data, so a changed dataset
    # invalidates a cached model.
    marker = data_dir / "demo.json"
    if not marker.is_file():
        raise EimError(f"no demo dataset in {data_dir} (missing demo.json)",
                       hint="generate it first with eimctl.data.demo.generate_demo_data")
    return json.loads(marker.read_text(encoding="utf-8"))["parameters"]


def _is_finished(model_dir: Path, parameters: dict) -> bool:
    marker = model_dir / "pretrain.json"
    if not marker.is_file():
        return False
    return json.loads(marker.read_text(encoding="utf-8")).get("parameters") == parameters


def _warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    # No decay on gains, biases, embeddings and the logit scale (as open_clip
    # and GPT-2 training do): decaying them only hurts a short run.
    decayed, kept = [], []
    for name, parameter in model.named_parameters():
        no_decay = parameter.ndim < 2 or "embedding" in name or "wte" in name or "wpe" in name
        (kept if no_decay else decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate)


class _Trainer:
    """Step counter, schedule, time cap and one log line per interval."""

    def __init__(self, name: str, optimizer, total_steps: int, learning_rate: float,
                 max_seconds: float | None, log: Log, log_every: int, metrics_path: Path):
        self.name, self.optimizer, self.total_steps = name, optimizer, total_steps
        self.learning_rate, self.max_seconds, self.log, self.log_every = learning_rate, max_seconds, log, log_every
        self.metrics_path = metrics_path
        self.step, self.start, self.last_loss, self.stopped_early = 0, time.monotonic(), float("nan"), False

    def out_of_time(self) -> bool:
        if self.max_seconds is not None and time.monotonic() - self.start > self.max_seconds:
            if not self.stopped_early:
                self.log(f"{self.name}: time cap of {self.max_seconds:.0f}s reached at step {self.step}")
            self.stopped_early = True
        return self.stopped_early

    def apply(self, loss: torch.Tensor) -> None:
        lr = self.learning_rate * _warmup_cosine(self.step, self.total_steps, max(1, self.total_steps // 10))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.last_loss = loss.item()
        if self.step % self.log_every == 0 or self.step == self.total_steps:
            elapsed = time.monotonic() - self.start
            self.log(f"{self.name} step {self.step}/{self.total_steps} loss {self.last_loss:.4f} "
                     f"lr {lr:.2e} elapsed {elapsed:.1f}s")
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.step, "loss": self.last_loss, "lr": lr,
                                         "elapsed_s": round(elapsed, 2)}) + "\n")


def _build_in_staging(target: Path, build: Callable[[Path], None]) -> None:
    ensure_replaceable(target, "pretrain.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(staging)
        publish_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# ----------------------------------------------------------------------------- CLIP


def pretrain_demo_clip(
    data_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    epochs: int = 12,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.1,
    model_cfg: dict | None = None,
    retrieval_images: int = 100,
    max_seconds: float | None = None,
    log: Log = print,
    log_every: int = 10,
) -> Path:
    """Contrastively pretrain a tiny open_clip CLIP; return `out_dir / "clip"` (a `local-dir:` folder)."""
    data_dir, target = Path(data_dir), Path(out_dir) / "clip"
    model_cfg = deepcopy(model_cfg or DEFAULT_CLIP_MODEL_CFG)
    parameters = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                  "weight_decay": weight_decay, "model_cfg": model_cfg, "retrieval_images": retrieval_images,
                  "max_seconds": max_seconds, "data": _data_parameters(data_dir)}
    if _is_finished(target, parameters):
        log(f"clip: already pretrained in {target}")
        return target
    image_size = model_cfg["vision_cfg"]["image_size"]
    preprocess_cfg = {"size": image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}

    def build(staging: Path) -> None:
        started = time.monotonic()
        torch.manual_seed(seed)
        model = open_clip.CLIP(**deepcopy(model_cfg))
        # The same eval transform the saved folder will hand back, so training
        # inputs match what users of the model feed it.
        preprocess = open_clip.image_transform(image_size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD,
                                               resize_mode="shortest", interpolation="bicubic")
        tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
        records = _read_jsonl(data_dir / "train.jsonl")
        image_paths = list(dict.fromkeys(r["image"] for r in records))
        image_index = {path: i for i, path in enumerate(image_paths)}
        images = torch.stack([preprocess(Image.open(data_dir / p).convert("RGB")) for p in image_paths])
        captions_of = [[] for _ in image_paths]
        for record in records:
            captions_of[image_index[record["image"]]].append(record["caption"])
        tokens_of = [tokenizer(captions) for captions in captions_of]
        log(f"clip: {len(image_paths)} images, {len(records)} captions, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

        steps_per_epoch = max(1, len(image_paths) // batch_size)
        trainer = _Trainer("clip", _adamw(model, learning_rate, weight_decay), epochs * steps_per_epoch,
                           learning_rate, max_seconds, log, log_every, staging / "metrics.jsonl")
        order_generator = torch.Generator().manual_seed(seed)
        model.train()
        for _epoch in range(epochs):
            order = torch.randperm(len(image_paths), generator=order_generator)
            # One caption per image per batch: two captions of one image in a
            # batch would be false negatives for each other.
            picks = [int(torch.randint(len(tokens_of[i]), (1,), generator=order_generator)) for i in order]
            for batch_start in range(0, steps_per_epoch * batch_size, batch_size):
                if trainer.out_of_time():
                    break
                batch = order[batch_start:batch_start + batch_size]
                texts = torch.stack([tokens_of[int(i)][picks[batch_start + j]] for j, i in enumerate(batch)])
                image_features = model.encode_image(images[batch], normalize=True)
                text_features = model.encode_text(texts, normalize=True)
                logits = model.logit_scale.exp() * image_features @ text_features.T
                labels = torch.arange(len(batch))
                loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
                trainer.apply(loss)
                with torch.no_grad():  # CLIP's cap on the temperature, for stability
                    model.logit_scale.clamp_(0, math.log(100))

        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(staging / "open_clip_model.safetensors"))
        write_json(staging / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
        train_seconds = time.monotonic() - started
        accuracy = clip_retrieval_accuracy(staging, data_dir, "val", retrieval_images)
        log(f"clip: val retrieval top-1 image->caption {accuracy['image_to_text_top1']:.3f}, "
            f"caption->image {accuracy['text_to_image_top1']:.3f} "
            f"(chance {accuracy['chance_top1']:.3f}, {accuracy['retrieval_images']} images), "
            f"trained {trainer.step} steps in {train_seconds:.0f}s")
        metrics = {**accuracy, "steps": trainer.step, "final_loss": trainer.last_loss,
                   "stopped_early": trainer.stopped_early, "train_seconds": round(train_seconds, 1)}
        write_json(staging / "pretrain.json", {"parameters": parameters, "metrics": metrics})

    _build_in_staging(target, build)
    return target


@torch.no_grad()
def clip_retrieval_accuracy(clip_dir: Path, data_dir: Path, split: str = "val", n_images: int = 100) -> dict:
    """Top-1 retrieval among the first `n_images` of `split`, loaded through open_clip's `local-dir:`."""
    model_name = "local-dir:" + str(clip_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    records = _read_jsonl(Path(data_dir) / f"{split}.jsonl")
    image_paths = list(dict.fromkeys(r["image"] for r in records))[:n_images]
    owner = {path: i for i, path in enumerate(image_paths)}
    kept = [r for r in records if r["image"] in owner]
    caption_owner = torch.tensor([owner[r["image"]] for r in kept])
    images = torch.stack([preprocess(Image.open(Path(data_dir) / p).convert("RGB")) for p in image_paths])
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokenizer([r["caption"] for r in kept]), normalize=True)
    similarity = image_features @ text_features.T
    image_to_text = (caption_owner[similarity.argmax(dim=1)] == torch.arange(len(image_paths))).float().mean()
    text_to_image = (similarity.argmax(dim=0) == caption_owner).float().mean()
    return {"image_to_text_top1": round(image_to_text.item(), 4), "text_to_image_top1": round(text_to_image.item(), 4),
            # Every image has the same number of captions, so both directions
            # have a chance level of one in n_images.
            "chance_top1": round(1 / len(image_paths), 4), "retrieval_images": len(image_paths)}


# ----------------------------------------------------------------------------- LM


def build_word_tokenizer(captions: list[str], model_max_length: int):
    """A word-level tokenizer over the caption vocabulary, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel(unk_token=UNKNOWN))
    # Whitespace also splits punctuation off words ("left," -> "left" ","); the
    # WordPiece decoder's cleanup glues it back ("left ," -> "left,").
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    word_level.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=[END_OF_TEXT, UNKNOWN]))
    return PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, unk_token=UNKNOWN, model_max_length=model_max_length)


def _caption_batch(token_ids: list[list[int]], end_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Each caption is framed as <|endoftext|> caption <|endoftext|>: the leading
    # token lets the LM learn the first word, the trailing one when to stop.
    framed = [[end_id] + ids + [end_id] for ids in token_ids]
    length = max(len(ids) for ids in framed)
    input_ids = torch.full((len(framed), length), end_id)
    attention_mask = torch.zeros((len(framed), length), dtype=torch.long)
    for row, ids in enumerate(framed):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def pretrain_demo_lm(
    data_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    epochs: int = 2,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.1,
    model_cfg: dict | None = None,
    max_seconds: float | None = None,
    log: Log = print,
    log_every: int = 25,
) -> Path:
    """Pretrain a tiny GPT-2 on the train captions; return `out_dir / "lm"` (a Hugging Face folder)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    data_dir, target = Path(data_dir), Path(out_dir) / "lm"
    model_cfg = {**DEFAULT_LM_CFG, **(model_cfg or {})}
    parameters = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                  "weight_decay": weight_decay, "model_cfg": model_cfg, "max_seconds": max_seconds,
                  "data": _data_parameters(data_dir)}
    if _is_finished(target, parameters):
        log(f"lm: already pretrained in {target}")
        return target

    def build(staging: Path) -> None:
        started = time.monotonic()
        torch.manual_seed(seed)
        captions = [r["caption"] for r in _read_jsonl(data_dir / "train.jsonl")]
        tokenizer = build_word_tokenizer(captions, model_cfg["n_positions"])
        end_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=end_id, eos_token_id=end_id,
                            pad_token_id=end_id, **model_cfg)
        model = GPT2LMHeadModel(config)
        token_ids = tokenizer(captions)["input_ids"]
        log(f"lm: {len(captions)} captions, vocabulary {len(tokenizer)}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

        steps_per_epoch = max(1, math.ceil(len(captions) / batch_size))
        trainer = _Trainer("lm", _adamw(model, learning_rate, weight_decay), epochs * steps_per_epoch,
                           learning_rate, max_seconds, log, log_every, staging / "metrics.jsonl")
        order_generator = torch.Generator().manual_seed(seed)
        model.train()
        for _epoch in range(epochs):
            order = torch.randperm(len(captions), generator=order_generator).tolist()
            for batch_start in range(0, len(order), batch_size):
                if trainer.out_of_time():
                    break
                batch = [token_ids[i] for i in order[batch_start:batch_start + batch_size]]
                input_ids, attention_mask, labels = _caption_batch(batch, end_id)
                trainer.apply(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)

        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        train_seconds = time.monotonic() - started
        # Measured on the saved copy, which also proves the folder loads back.
        reloaded = AutoModelForCausalLM.from_pretrained(staging)
        perplexity = lm_perplexity(reloaded, tokenizer, [r["caption"] for r in _read_jsonl(data_dir / "val.jsonl")])
        log(f"lm: val perplexity {perplexity:.3f} (vocabulary {len(tokenizer)}), "
            f"trained {trainer.step} steps in {train_seconds:.0f}s")
        metrics = {"val_perplexity": round(perplexity, 4), "vocab_size": len(tokenizer), "steps": trainer.step,
                   "final_loss": trainer.last_loss, "stopped_early": trainer.stopped_early,
                   "train_seconds": round(train_seconds, 1)}
        write_json(staging / "pretrain.json", {"parameters": parameters, "metrics": metrics})

    _build_in_staging(target, build)
    return target


@torch.no_grad()
def lm_perplexity(model, tokenizer, captions: list[str], batch_size: int = 128) -> float:
    """Per-token perplexity of `captions`, each framed as <|endoftext|> caption <|endoftext|>."""
    model.eval()
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(captions), batch_size):
        input_ids, attention_mask, labels = _caption_batch(
            tokenizer(captions[start:start + batch_size])["input_ids"], end_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        shifted_labels = labels[:, 1:]
        total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), shifted_labels.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
        total_tokens += int((shifted_labels != -100).sum())
    return math.exp(total_nll / total_tokens)
