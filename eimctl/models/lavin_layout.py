"""LaVIN's sequences: the image block at the start, then the text (eimctl/models/lavin.py uses this).

    image sample      [image_prefix tokens][n visual tokens] + text
    text-only sample  [no_image_text tokens]                 + text

(the modality token is position 0 and runs apart: eimctl/models/lavin_parts.modality_routing). The prefix
strings are tokenised without special tokens. The blocks differ in length between image and text-only
samples, so each row is built on its own: training rows are right-padded with per-row labels (IGNORE_INDEX
at the block, the prompt and the padding), prompts for decoding are left-padded.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from eimctl.models.lm import IGNORE_INDEX, response_labels


def prefix_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def row_blocks(image_prefix: Tensor, no_image: Tensor, visual: Tensor | None, has_image: Tensor) -> list[Tensor]:
    """Each row's block [k_r, D]: `image_prefix` ++ its visual tokens, or the `no_image` text's embeddings."""
    flags = has_image.tolist()
    return [torch.cat([image_prefix, visual[row].to(image_prefix.dtype)]) if flag else no_image
            for row, flag in enumerate(flags)]


def training_rows(blocks: list[Tensor], text: Tensor, batch: dict) -> tuple[Tensor, Tensor, Tensor, int]:
    """(embeds [B, S, D], mask [B, S], labels [B, S], offset) for right-padded text embeddings `text` [B, L, D]
    and the batch's `input_ids`, `attention_mask` and `loss_mask`. labels[r, p] is the token at p where the
    loss mask scores it, else IGNORE_INDEX; offset is the block length when every row has the same one
    (a batch of one modality), else 0 (then only `labels` places the text)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    targets = response_labels(batch["input_ids"], batch["loss_mask"])
    rows, labels = [], []
    for row, block in enumerate(blocks):
        count = lengths[row]
        rows.append(torch.cat([block, text[row, :count].to(block.dtype)]))
        labels.append(torch.cat([targets.new_full((len(block),), IGNORE_INDEX), targets[row, :count]]))
    sizes = torch.tensor([len(row) for row in rows], device=text.device)
    embeds = pad_sequence(rows, batch_first=True)
    mask = (torch.arange(embeds.shape[1], device=text.device)[None] < sizes[:, None]).long()
    offsets = {len(block) for block in blocks}
    return (embeds, mask, pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
            offsets.pop() if len(offsets) == 1 else 0)


def prompt_rows(blocks: list[Tensor], prompts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Left-padded (embeds [B, S, D], mask [B, S]) of each row's block followed by its prompt [p_r, D]."""
    rows = [torch.cat([block, prompt.to(block.dtype)]) for block, prompt in zip(blocks, prompts, strict=True)]
    width = max(len(row) for row in rows)
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for index, row in enumerate(rows):
        embeds[index, width - len(row):] = row
        mask[index, width - len(row):] = 1
    return embeds, mask
