"""The ClipCap-family captioner: CLIP -> projector (ST) -> causal LM, and loss_base.

loss_base is the autoregressive cross-entropy over caption tokens only. Padding is
excluded by an explicit mask, never by a token id (GPT-2's token 0, "!", is real).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eimctl.config import DataConfig, ModelConfig
from eimctl.errors import EimError
from eimctl.models.clip import ClipEncoder
from eimctl.models.lm import load_lm
from eimctl.models.projectors import build_projector
from eimctl.progress import log


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig, prompt_tokens: int = 0, ie_head: bool = False):
        super().__init__()
        self.clip = ClipEncoder(cfg.clip, prompt_tokens, ie_head)
        self.lm, self.tokenizer = load_lm(cfg.lm)
        self.lm_dim = self.lm.get_input_embeddings().embedding_dim
        self.projector = build_projector(cfg.projector, self.clip.feature_dim, self.clip.num_tokens, self.lm_dim)

    def compile_for_training(self) -> None:
        """torch.compile the projector and the LM in place (train.compile); parameter names stay the same.

        dynamic=True: caption lengths change from batch to batch, and one graph for all of them
        beats recompiling for each new length."""
        self.projector.compile(dynamic=True)
        self.lm.compile(dynamic=True)

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """Image features [B, T, d] -> LM prefix embeddings [B, P, D]."""
        return self.projector(features)

    def run_lm(self, prefix: torch.Tensor | None, caption_ids: torch.Tensor, caption_mask: torch.Tensor,
               hidden: bool = False):
        """LM over [prefix +] caption embeddings: (logits, last-token hidden state or None).

        The last-token hidden state is the final block's output after the final norm at the
        caption's last real token (its eos)."""
        tokens = self.lm.get_input_embeddings()(caption_ids)
        inputs = tokens if prefix is None else torch.cat([prefix, tokens.to(prefix.dtype)], dim=1)
        out = self.lm(inputs_embeds=inputs, output_hidden_states=hidden)
        last = None
        if hidden:
            offset = 0 if prefix is None else prefix.shape[1]
            positions = offset + caption_mask.sum(dim=1) - 1
            last = out.hidden_states[-1][torch.arange(len(positions), device=positions.device), positions]
        return out.logits, last

    @staticmethod
    def caption_cross_entropy(logits: torch.Tensor, prefix_length: int, caption_ids: torch.Tensor,
                              caption_mask: torch.Tensor) -> torch.Tensor:
        # The logit at position t predicts token t+1: prefix's last position predicts caption token 0.
        caption_logits = logits[:, prefix_length - 1:-1]
        losses = F.cross_entropy(caption_logits.reshape(-1, caption_logits.shape[-1]).float(),
                                 caption_ids.reshape(-1), reduction="none")
        mask = caption_mask.reshape(-1).to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp_min(1)

    def loss_base(self, features: torch.Tensor, caption_ids: torch.Tensor,
                  caption_mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the caption tokens marked in `caption_mask` ([B, L], 1 = real)."""
        prefix = self.prefix(features)
        logits, _ = self.run_lm(prefix, caption_ids, caption_mask)
        return self.caption_cross_entropy(logits, prefix.shape[1], caption_ids, caption_mask)


def tokenize_captions(tokenizer, captions: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each caption followed by eos, cut to `max_tokens`; also how many were cut."""
    encoded = tokenizer(captions, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out, truncated = [], 0
    for ids in encoded:
        ids = list(ids) + [eos]
        if len(ids) > max_tokens:
            truncated += 1
            ids = ids[:max_tokens]
        out.append(ids)
    return out, truncated


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest; returns (ids [B, L], mask [B, L] with 1 for real tokens)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


def tokenize_split(tokenizer, split, data: DataConfig, show: bool = True) -> list[list[int]]:
    """Token ids of every sample's caption; over-long ones are cut with a warning, or refused
    when `data.overlong=refuse`."""
    ids, truncated = tokenize_captions(tokenizer, [s.caption for s in split.samples], data.max_caption_tokens)
    if truncated and data.overlong == "refuse":
        raise EimError(f"{truncated} captions exceed data.max_caption_tokens={data.max_caption_tokens}",
                       where=f"{data.path} ({split.name})",
                       hint="raise data.max_caption_tokens, or set data.overlong=truncate")
    if truncated:
        log(f"warning: {truncated} captions longer than {data.max_caption_tokens} tokens were truncated", show)
    return ids
