"""Tiny models and data built from configs for tests (nothing is downloaded)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "bar")
WORDS = sorted({*COLOURS, *SHAPES, "a", "the", "big", "small", "picture", "of", "there", "is"})


def make_tiny_clip(out: Path, image_size: int = 32, patch: int = 8, width: int = 32, layers: int = 1) -> str:
    """An open_clip `local-dir:` folder with a random tiny ViT CLIP; returns the model name."""
    import open_clip
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {"embed_dim": 24,
                 "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch,
                                "head_width": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    preprocess_cfg = {"size": image_size, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                           "preprocess_cfg": preprocess_cfg}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    return f"local-dir:{out}"


def make_tiny_lm(out: Path, n_embd: int = 32, kind: str = "gpt2", dropout: float = 0.1) -> str:
    """A Hugging Face causal LM folder (random weights, word-level tokenizer; GPT-2 with `dropout`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=n_embd, n_layer=1, n_head=2,
                                           n_positions=96, eos_token_id=0, bos_token_id=0, resid_pdrop=dropout,
                                           embd_pdrop=dropout, attn_pdrop=dropout))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=n_embd, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=96, eos_token_id=0, bos_token_id=0))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def make_tiny_llama(out: Path, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                    words: list[str] | None = None) -> str:
    """A tiny random LLaMA (grouped-query attention: `kv_heads` < `heads`) with a word-level tokenizer whose
    id 0 is a real token (as SmolLM2's <|endoftext|> is), so loss labels must not use 0 as "ignore"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    extra = sorted(set(words or []) - set(WORDS))
    vocab = {"<|endoftext|>": 0, "<unk>": 1, "<s>": 2, "</s>": 3,
             **{w: i + 4 for i, w in enumerate([*WORDS, *extra])}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", bos_token="<s>",
                                        pad_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=kv_heads, max_position_embeddings=512,
                                         bos_token_id=2, eos_token_id=3, pad_token_id=3))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def make_tiny_data(out: Path, n_train: int = 24, n_val: int = 6, n_test: int = 6, size: int = 32) -> Path:
    """A JSONL captioning data set of coloured shapes; test images get 3 references each."""
    rng = random.Random(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, count, refs in (("train", n_train, 2), ("val", n_val, 3), ("test", n_test, 3)):
        lines = []
        for n in range(count):
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            image = Image.new("RGB", (size, size), (255, 255, 255))
            box = (8, 8, 24, 24) if shape == "square" else (4, 12, 28, 20)
            image.paste(COLOURS[colour], box)
            name = f"images/{split}-{n}.png"
            image.save(out / name)
            captions = [f"a {colour} {shape}", f"the {colour} {shape}", f"there is a {colour} {shape}"]
            for k in range(refs):
                lines.append(json.dumps({"sample_id": f"{split}-{n}-{k}", "image": name, "caption": captions[k]}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def scienceqa_words(data: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The word-level vocabulary of a generated ScienceQA set's text, plus the prompt format's markers."""
    import re

    problems = json.loads((Path(data) / "problems.json").read_text())
    words = {w for p in problems.values() for field in ("question", "hint", "lecture", "solution")
             for w in re.findall(r"\w+|[^\w\s]", p[field])}
    words |= {w for p in problems.values() for c in p["choices"] for w in re.findall(r"\w+|[^\w\s]", c)}
    words |= {"Question", "Context", "Options", "Response", "The", "answer", "is", "BECAUSE", "(", ")", ":", ".",
              *extra}
    return sorted(words)
