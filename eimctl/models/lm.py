"""Causal language model and tokenizer through Hugging Face's own loaders.

`model.lm.name` is a hub id or a local directory; `model.lm.gguf_file` names a
GGUF file inside that directory. Remote model code runs only when
`model.lm.trust_remote_code=true` is set explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from eimctl.runtime.errors import EimError
from eimctl.runtime.hub import hub_online, offline_reason, quiet_loading, short


IGNORE_INDEX = -100  # unscored label positions; never 0, a real token in many vocabularies (SmolLM2's <|endoftext|>)


@dataclass
class LMConfig:
    name: str = "gpt2"               # Hugging Face id or local directory
    gguf_file: str = ""              # GGUF file name inside `name` (a directory), if the LM is GGUF
    trust_remote_code: bool = False  # run model code shipped with the weights (off unless asked)


def load_lm(cfg: LMConfig):
    """(model, tokenizer); the tokenizer always has an eos token and a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        if not (Path(cfg.name) / cfg.gguf_file).is_file():
            raise EimError(f"GGUF file not found: {Path(cfg.name) / cfg.gguf_file}", where="model.lm.gguf_file",
                           hint="model.lm.name must be the folder holding the file")
        kwargs["gguf_file"] = cfg.gguf_file
    online = hub_online() if not Path(cfg.name).is_dir() else True
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(cfg.name, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(cfg.name, **kwargs)
    except (OSError, ValueError) as error:
        why = f"{offline_reason()} and it is not in the local cache" if not online else \
            (short(str(error), 200) or type(error).__name__)
        raise EimError(f"cannot load language model '{cfg.name}': {why}", where="model.lm.name",
                       hint="supply it one of three ways: download the id once with network access (into the "
                            "Hugging Face cache, ~/.cache/huggingface), or set model.lm.name to a local "
                            "directory with config + weights + tokenizer, or a GGUF file in that directory via "
                            "model.lm.gguf_file; remote code needs model.lm.trust_remote_code=true") from None
    if tokenizer.eos_token_id is None:
        raise EimError(f"the tokenizer of '{cfg.name}' has no eos token", where="model.lm.name",
                       hint="captions end with eos; use a tokenizer that defines one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def final_hidden(lm, **inputs):
    """The LM backbone's output: the final block's hidden states after the final norm, [B, S, D].

    Both sides of loss_LM read this: the frozen LM for the key queue (`input_ids`
    with an `attention_mask`) and the tuned LM for the query (`inputs_embeds`).
    Only the backbone runs, so no [B, S, vocab] LM head product is made unless asked."""
    return lm.base_model(**inputs).last_hidden_state


def response_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Targets for the text: the token where `loss_mask` is 1, IGNORE_INDEX elsewhere (prompt, padding)."""
    return input_ids.masked_fill(loss_mask == 0, IGNORE_INDEX)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at t predict labels at t+1; IGNORE_INDEX positions unscored."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
