"""Causal language model and tokenizer through Hugging Face's own loaders.

`model.lm.name` is a hub id or a local directory; `model.lm.gguf_file` names a
GGUF file inside that directory. Remote model code runs only when
`model.lm.trust_remote_code=true` is set explicitly.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    load_in_4bit: bool = False       # load the LM 4-bit (bitsandbytes nf4, bf16 compute; needs CUDA + bitsandbytes)


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
    quantized = four_bit_options() if cfg.load_in_4bit else {}
    online = hub_online() if not Path(cfg.name).is_dir() else True
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(cfg.name, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(cfg.name, **kwargs, **quantized)
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


def four_bit_options() -> dict:
    """from_pretrained's arguments for a 4-bit LM (nf4 weights, bf16 compute), or one clear error where that
    cannot run: bitsandbytes' 4-bit kernels need a CUDA GPU (the package is not a dependency of eimctl)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise EimError("4-bit loading needs a CUDA GPU and the bitsandbytes package; set model.lm.load_in_4bit=false",
                       where="model.lm.load_in_4bit",
                       hint="on a CUDA machine: pip install bitsandbytes" if torch.cuda.is_available() else None)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def enable_checkpointing(lm, hook_state: Callable[[], list[tuple[object, str]]] | None = None) -> None:
    """Activation (gradient) checkpointing of the LM's decoder layers (train.grad_checkpointing), non-reentrant.

    A layer is recomputed in the backward pass, after the family's forward has left the context that set its
    hooks' Python-side state (routing weights, visual prompts). `hook_state()` names that state as (object,
    attribute) pairs: their values are taken as each layer first runs and put back while it is recomputed,
    so the recomputed activations, and the gradients, are those of the forward pass."""
    kwargs: dict = {"use_reentrant": False}
    if hook_state is not None:
        def context_fn():
            saved = [(owner, name, getattr(owner, name)) for owner, name in hook_state()]
            return nullcontext(), _restored(saved)
        kwargs["context_fn"] = context_fn
    if hasattr(lm, "activation_checkpointing_enable"):   # transformers 5.x; the older name is deprecated there
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:  # non-reentrant checkpointing needs no gradient on the input embeddings: keep the graph as it was
        lm.disable_input_require_grads()
    except AttributeError:
        pass


@contextmanager
def _restored(saved: list[tuple[object, str, object]]):
    current = [(owner, name, getattr(owner, name)) for owner, name, _ in saved]
    for owner, name, value in saved:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in current:
            setattr(owner, name, value)


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


def with_bos(ids: torch.Tensor, mask: torch.Tensor, bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids`/`mask` with the BOS token first in every row (LLaMA-style LMs are pretrained on sequences that begin
    with it; a right-padded batch stays right-padded). Unchanged when `bos_id` is None."""
    if bos_id is None:
        return ids, mask
    column = ids.new_full((ids.shape[0], 1), bos_id)
    return torch.cat([column, ids], dim=1), torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)


def plain_text_hidden(lm, ids: torch.Tensor, mask: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """The LM's final hidden states over text [B, L, D], read after a leading BOS (then dropped) when given."""
    full_ids, full_mask = with_bos(ids, mask, bos_id)
    hidden = final_hidden(lm, input_ids=full_ids, attention_mask=full_mask, use_cache=False)
    return hidden if bos_id is None else hidden[:, 1:]
