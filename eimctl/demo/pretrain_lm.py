"""The demo's own small language model: a word tokenizer over the captions, causal-LM pretraining, perplexity.

    lm_dir = pretrain_demo_lm(Path("runs/demo/data"), Path("runs/demo/models"))
    AutoModelForCausalLM.from_pretrained(lm_dir); AutoTokenizer.from_pretrained(lm_dir)
"""
from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from eimctl.demo.common import Log, StepTrainer, data_parameters, pretrain_once, train_causal_lm, write_marker
from eimctl.runtime.jsonl import read_jsonl

DEFAULT_LM_CFG = {"n_embd": 192, "n_layer": 3, "n_head": 4, "n_positions": 128}
END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<unk>"


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


def _captions(path: Path) -> list[str]:
    records, _ = read_jsonl(path)
    return [r["caption"] for r in records]


def pretrain_demo_lm(data_dir: Path, out_dir: Path, *, seed: int = 0, epochs: int = 2, batch_size: int = 64,
                     learning_rate: float = 1e-3, weight_decay: float = 0.1, model_cfg: dict | None = None,
                     max_seconds: float | None = None, log: Log = print, log_every: int = 25) -> Path:
    """Pretrain a tiny GPT-2 on the train captions; return `out_dir / "lm"` (a Hugging Face folder)."""
    data_dir, target = Path(data_dir), Path(out_dir) / "lm"
    model_cfg = {**DEFAULT_LM_CFG, **(model_cfg or {})}
    parameters = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                  "weight_decay": weight_decay, "model_cfg": model_cfg, "max_seconds": max_seconds,
                  "data": data_parameters(data_dir)}
    build = partial(_build_lm, data_dir=data_dir, parameters=parameters, log=log, log_every=log_every)
    return pretrain_once("lm", target, parameters, build, log)


def _build_lm(staging: Path, *, data_dir: Path, parameters: dict, log: Log, log_every: int) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    started = time.monotonic()
    model_cfg = parameters["model_cfg"]
    torch.manual_seed(parameters["seed"])
    captions = _captions(data_dir / "world.jsonl")
    tokenizer = build_word_tokenizer(captions, model_cfg["n_positions"])
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=end_id, eos_token_id=end_id,
                        pad_token_id=end_id, **model_cfg)
    model = GPT2LMHeadModel(config)
    token_ids = tokenizer(captions)["input_ids"]
    log(f"lm: {len(captions)} captions, vocabulary {len(tokenizer)}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    trainer = _train(model, token_ids, end_id, parameters, staging, log, log_every)

    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    train_seconds = time.monotonic() - started
    # Measured on the saved copy, which also proves the folder loads back.
    reloaded = AutoModelForCausalLM.from_pretrained(staging)
    perplexity = lm_perplexity(reloaded, tokenizer, _captions(data_dir / "val.jsonl"))
    log(f"lm: val perplexity {perplexity:.3f} (vocabulary {len(tokenizer)}), "
        f"trained {trainer.step} steps in {train_seconds:.0f}s")
    write_marker(staging, parameters, {"val_perplexity": round(perplexity, 4), "vocab_size": len(tokenizer),
                                       **trainer.summary(train_seconds)})


def _train(model, token_ids: list[list[int]], end_id: int, parameters: dict, staging: Path, log: Log,
           log_every: int) -> StepTrainer:
    return train_causal_lm("lm", model, token_ids, partial(_caption_batch, end_id=end_id), parameters, staging,
                           log, log_every)


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
