"""The three key queues and the queries they meet, side by side, so a key and its query share one function.

    kind  loss  key (frozen, one row per training sample)             query (trained side, per batch)
    kt    ie    CLIP.text [EOS] of the sample's caption (joint space)  CLIP [CLS] mapped into the joint space
    ke    st    mean LM embedding-layer output over the sequence       mean of the ST output tokens
    kb    lm    frozen LM's last-token hidden state of the sequence    tuned LM's last-token hidden state

"The sequence" is the sample's instruction + response + eos (tokens from
eimctl.data.tokens); for captioning it is the caption + eos. "Last-token hidden
state" is the final block's output after the final norm at the last real token,
`last_token(hidden, mask)`, on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from eimctl.eim.losses import last_token, mean_pool
from eimctl.models.protocol import LMOutput


@dataclass
class ForwardState:
    """What one batch's forward pass produced, for the queries to read."""
    features: torch.Tensor | None = None   # CLIP features [B, T, d]
    visual: torch.Tensor | None = None     # ST output tokens [B, Q, D]
    lm: LMOutput | None = None             # the LM pass loss_LM's query reads


@dataclass(frozen=True)
class QueueKind:
    name: str                 # file name in the queue store: <name>.parquet
    loss: str                 # the contrastive loss that reads it
    encoder: str              # "clip" or "lm": whose model name is recorded with the keys
    field: str                # what a key is, as written into the Parquet metadata
    text: str                 # "clip": keys from CLIP-tokenised text; "lm": from LM token ids
    key: Callable             # (model, prepared batch) -> keys [B, width]
    query: Callable           # (model, ForwardState) -> queries [B, width]
    width: Callable           # model -> key/query width


def _text_eos_key(model, prepared: dict) -> torch.Tensor:
    return model.clip.encode_text_ids(prepared["clip_ids"])


def _embedding_mean_key(model, prepared: dict) -> torch.Tensor:
    return mean_pool(model.embed_tokens(prepared["input_ids"]), prepared["attention_mask"])


def _last_token_key(model, prepared: dict) -> torch.Tensor:
    mask = prepared["attention_mask"]
    return last_token(model.text_hidden(prepared["input_ids"], mask), mask)


def _ie_query(model, state: ForwardState) -> torch.Tensor:
    return model.ie_query(state.features)


def _st_query(model, state: ForwardState) -> torch.Tensor:
    return state.visual.mean(dim=1)


def _lm_query(model, state: ForwardState) -> torch.Tensor:
    return last_token(state.lm.hidden, state.lm.mask)


QUEUE_KINDS = (
    QueueKind("kt", "ie", "clip", "clip.text.eos", "clip", _text_eos_key, _ie_query, lambda m: m.clip.embed_dim),
    QueueKind("ke", "st", "lm", "lm.embedding.mean", "lm", _embedding_mean_key, _st_query, lambda m: m.lm_dim),
    QueueKind("kb", "lm", "lm", "lm.last_token.hidden", "lm", _last_token_key, _lm_query, lambda m: m.lm_dim),
)
KIND_BY_NAME = {kind.name: kind for kind in QUEUE_KINDS}
KIND_OF_LOSS = {kind.loss: kind for kind in QUEUE_KINDS}
