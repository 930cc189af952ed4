"""Token ids of (instruction, response) pairs, and right-padded batches with their masks.

A sample's sequence is `instruction tokens + response tokens + eos`; loss_base
scores the response and the eos (the loss mask), while Ke and Kb cover the whole
sequence. Captioning has an empty instruction, so its sequence is the caption + eos.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eimctl.runtime.errors import EimError
from eimctl.runtime.progress import log


@dataclass(frozen=True)
class TokenizedText:
    ids: list[int]
    response_start: int  # index of the first response token in `ids`


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_tokens: int) -> tuple[list[TokenizedText], int]:
    """Each (instruction, response) as instruction ids + response ids + eos, cut to `max_tokens`;
    also how many were cut."""
    responses = tokenizer([response for _, response in pairs], add_special_tokens=False)["input_ids"]
    instructions = [[] for _ in pairs]
    if any(instruction for instruction, _ in pairs):
        instructions = tokenizer([instruction for instruction, _ in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out, truncated = [], 0
    for instruction, response in zip(instructions, responses):
        ids = list(instruction) + list(response) + [eos]
        if len(ids) > max_tokens:
            truncated += 1
            ids = ids[:max_tokens]
        out.append(TokenizedText(ids, min(len(instruction), len(ids))))
    return out, truncated


def tokenize_for_training(tokenizer, pairs: list[tuple[str, str]], data, where: str,
                          show: bool = True) -> list[TokenizedText]:
    """tokenize_pairs with `data.max_caption_tokens`; over-long samples are cut with a warning, or
    refused when `data.overlong=refuse`."""
    tokens, truncated = tokenize_pairs(tokenizer, pairs, data.max_caption_tokens)
    if truncated and data.overlong == "refuse":
        raise EimError(f"{truncated} samples exceed data.max_caption_tokens={data.max_caption_tokens}",
                       where=where, hint="raise data.max_caption_tokens, or set data.overlong=truncate")
    if truncated:
        log(f"warning: {truncated} samples longer than {data.max_caption_tokens} tokens were truncated", show)
    return tokens


def pad_batch(samples: list[TokenizedText], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: `input_ids`, `attention_mask` (1 = real token) and `loss_mask`
    (1 = response token), each [B, L]."""
    length = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), length), dtype=torch.long)
    loss = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, :len(sample.ids)] = torch.tensor(sample.ids, dtype=torch.long)
        attention[row, :len(sample.ids)] = 1
        loss[row, sample.response_start:len(sample.ids)] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}
